pub struct PrepareOptions; pub struct PrepareSummary; pub struct ArchiveSpec; pub fn prepare(_o:&PrepareOptions)->anyhow::Result<PrepareSummary>{todo!()}
