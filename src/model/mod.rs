//! The model: MobileNetV3-Small backbone (timm tensor names) -> FPN (128 ch, torchvision
//! layout + extra max-pool level) -> one two-layer head on the stride-8 map. The head's
//! output channels are the tasks' slices laid side by side ([`crate::tasks::TaskSet`]); the
//! model itself knows no task.

pub mod fpn;
pub mod info;
pub mod init;
pub mod layers;
pub mod mobilenetv3;
pub mod weights;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

pub use fpn::Fpn;
pub use info::{count_params, info_report, InfoReport, ParamCounts};
pub use mobilenetv3::MobileNetV3;
pub use weights::{load_backbone, resolve, LoadReport, WeightsSpec};

use crate::ops;
pub use crate::ops::fused::Executor;
use layers::{torch_default_init, Conv, ConvKind};

/// Stride of the map the unified head runs on.
pub const OUTPUT_STRIDE: usize = 8;

/// Neck width and the head's output channels (the sum of the tasks' slices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneHeadConfig {
    pub fpn_channels: usize,
    pub head_channels: usize,
}

impl Default for OneHeadConfig {
    /// The report's configuration: FPN 128, head 21 (VOC) + 5 + 10 (mini-COCO) + 10
    /// (Imagenette) = 46 channels.
    fn default() -> Self {
        Self {
            fpn_channels: 128,
            head_channels: 21 + 5 + 10 + 10,
        }
    }
}

/// Inputs must have H and W multiples of this (the backbone's output stride).
pub const INPUT_MULTIPLE: usize = 32;

/// The unified head: `Conv3x3(C->C, bias) -> ReLU -> Conv1x1(C -> head_channels, bias)`.
#[derive(Debug, Clone)]
pub struct UnifiedHead {
    conv: Conv,
    out: Conv,
}

impl UnifiedHead {
    /// `vb` is the head's root (`head.conv.*`, `head.out.*`); PyTorch's default conv init.
    pub fn new(cfg: &OneHeadConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.fpn_channels;
        let init3 = torch_default_init(c * 9);
        let init1 = torch_default_init(c);
        Ok(Self {
            conv: Conv::new(
                c,
                c,
                3,
                1,
                ConvKind::Dense,
                true,
                init3,
                init3,
                vb.pp("conv"),
            )?,
            out: Conv::new(
                c,
                cfg.head_channels,
                1,
                1,
                ConvKind::Pointwise,
                true,
                init1,
                init1,
                vb.pp("out"),
            )?,
        })
    }
}

impl UnifiedHead {
    /// The head as steps of a fused plan.
    pub fn plan(
        &self,
        pb: &mut ops::fused::PlanBuilder,
        x: ops::fused::Id,
    ) -> Result<ops::fused::Id> {
        let y = self.conv.plan(pb, x)?;
        let y = pb.act(y, ops::fused::Act::Relu);
        self.out.plan(pb, y)
    }
}

impl Module for UnifiedHead {
    /// `(B, C, h, w) -> (B, head_channels, h, w)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out
            .forward(&ops::channel::relu(&self.conv.forward(x)?)?)
    }
}

/// MobileNetV3-Small (`backbone.`) -> FPN (`fpn.`) -> unified head (`head.`).
#[derive(Debug, Clone)]
pub struct OneHead {
    cfg: OneHeadConfig,
    backbone: MobileNetV3,
    fpn: Fpn,
    head: UnifiedHead,
    /// Which implementation runs `forward_t`/`forward_parts` (see [`Executor`]).
    executor: Executor,
}

impl OneHead {
    /// Build with `vb` at the model root; variables are created in the VarMap behind `vb`
    /// (random init as torchvision) and can then be overwritten by [`load_backbone`].
    /// The executor starts as [`Executor::from_env`]: fused, unless `ONEHEAD_FUSED=0`.
    pub fn new(cfg: &OneHeadConfig, vb: VarBuilder) -> Result<Self> {
        let backbone = MobileNetV3::small(vb.pp("backbone"))?;
        let fpn = Fpn::new(&mobilenetv3::TAP_CHANNELS, cfg.fpn_channels, vb.pp("fpn"))?;
        let head = UnifiedHead::new(cfg, vb.pp("head"))?;
        Ok(Self {
            cfg: cfg.clone(),
            backbone,
            fpn,
            head,
            executor: Executor::from_env(),
        })
    }

    pub fn config(&self) -> &OneHeadConfig {
        &self.cfg
    }

    /// Which implementation runs the forward and backward.
    pub fn executor(&self) -> Executor {
        self.executor
    }

    /// Choose the implementation: [`Executor::Fused`] (the whole network as one op where
    /// [`ops::fused::supported`], i.e. CPU f32; per-layer ops elsewhere) or
    /// [`Executor::PerLayer`]. Same computation either way (the fused path is tested against
    /// the per-layer one); this wins over `ONEHEAD_FUSED`.
    pub fn set_executor(&mut self, executor: Executor) {
        self.executor = executor;
    }

    /// [`OneHead::set_executor`] as a builder.
    pub fn with_executor(mut self, executor: Executor) -> Self {
        self.executor = executor;
        self
    }

    /// `x (B,3,H,W)`, H and W multiples of 32 -> the head map `(B, head_channels, H/8,
    /// W/8)`. `train` switches BatchNorm to batch statistics (and updates the running ones).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_parts(x, train, train)
    }

    /// As [`OneHead::forward_t`] with separate modes: `backbone_train = false` freezes the
    /// backbone's BatchNorm statistics while the rest trains. (Neck and head have no
    /// BatchNorm or dropout today; `head_train` is kept for when they do.)
    pub fn forward_parts(
        &self,
        x: &Tensor,
        backbone_train: bool,
        head_train: bool,
    ) -> Result<Tensor> {
        let _ = head_train;
        check_input(x)?;
        if self.executor == Executor::Fused && ops::fused::supported(x) {
            // CPU: the whole network as one fused op (ops::fused), same computation.
            return self
                .plan(backbone_train)?
                .run(x, backbone_train || head_train);
        }
        let taps = self.backbone.forward_features(x, backbone_train)?;
        // Only the finest FPN level feeds the head: the coarser outputs and the max-pool
        // level of torchvision's FPN are not computed (their parameters exist, for the
        // report's layout and parameter count, but get no gradient).
        let finest = self.fpn.forward_finest(&taps)?;
        self.head.forward(&finest)
    }

    /// The whole network as a fused plan (`train`: BatchNorms with batch statistics).
    fn plan(&self, train: bool) -> Result<ops::fused::Plan> {
        let mut pb = ops::fused::PlanBuilder::new();
        let input = pb.input();
        let taps = self.backbone.plan(&mut pb, input, train)?;
        let level0 = self.fpn.plan_finest(&mut pb, &taps)?;
        let y = self.head.plan(&mut pb, level0)?;
        Ok(pb.finish(y))
    }

    /// The model ready for many evaluation forwards with its weights as they are now (a
    /// batch of evaluation, prediction, a latency run): [`Inference::forward`] gives the
    /// values of `forward_t(x, false)` without redoing the per-call set-up of the fused op.
    /// On that path it is a snapshot: weights and statistics changed after this call do not
    /// reach it (the per-layer path reads the variables at each call).
    pub fn inference(&self) -> Result<Inference> {
        let prepared = match self.executor {
            Executor::Fused => {
                let plan = self.plan(false)?;
                // Other devices take the per-layer path, as in `forward_parts`.
                plan.params_supported()
                    .then(|| plan.prepare())
                    .transpose()?
            }
            Executor::PerLayer => None,
        };
        Ok(Inference {
            model: self.clone(),
            prepared,
        })
    }
}

/// `x` must be `(B, 3, H, W)` with H and W positive multiples of [`INPUT_MULTIPLE`].
fn check_input(x: &Tensor) -> Result<()> {
    let (_, c, h, w) = x.dims4()?;
    // Multiples of 32 keep every level exactly half the previous one (FPN sums) and keep
    // H and W of equal parity for the stride-2 dense stem conv, whose candle backward
    // fails otherwise (docs/CANDLE_NOTES.md).
    if c != 3 || h % INPUT_MULTIPLE != 0 || w % INPUT_MULTIPLE != 0 || h == 0 || w == 0 {
        candle_core::bail!(
            "onehead: input must be (B, 3, H, W) with H and W positive multiples of {INPUT_MULTIPLE}, got {:?}; resize or pad the images",
            x.dims()
        )
    }
    Ok(())
}

/// A model prepared for evaluation forwards ([`OneHead::inference`]).
pub struct Inference {
    model: OneHead,
    /// The fused plan with the weights copied in (CPU f32 with the fused executor).
    prepared: Option<ops::fused::Prepared>,
}

impl Inference {
    /// `forward_t(x, false)`'s values; not differentiable on the fused path.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.prepared {
            Some(p) if ops::fused::supported(x) => {
                check_input(x)?;
                p.run(x)
            }
            _ => self.model.forward_t(x, false),
        }
    }
}

/// A frozen copy of a model: its own variables, copied from another model's, for teachers
/// and snapshots. Run it with `forward_t(x, false)` (inference mode, no statistics update).
pub struct Frozen {
    pub varmap: VarMap,
    pub model: OneHead,
}

impl Frozen {
    /// Copy every variable of `varmap` (a model built with `cfg`) into a new model.
    pub fn snapshot(varmap: &VarMap, cfg: &OneHeadConfig, device: &Device) -> Result<Self> {
        Self::from_tensors(&tensors_of(varmap)?, cfg, device)
    }

    /// A model built with `cfg` whose variables take the values of `tensors` (by name).
    pub fn from_tensors(
        tensors: &BTreeMap<String, Tensor>,
        cfg: &OneHeadConfig,
        device: &Device,
    ) -> Result<Self> {
        let vm = VarMap::new();
        let model = OneHead::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, device))?;
        set_from(&vm, tensors)?;
        Ok(Self { varmap: vm, model })
    }

    /// The variables by name (copies).
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        tensors_of(&self.varmap)
    }
}

/// Copies of every variable of `varmap`, by name.
pub fn tensors_of(varmap: &VarMap) -> Result<BTreeMap<String, Tensor>> {
    varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        // Detached: a copy of a variable would otherwise stay a function of it for backprop.
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
        .collect()
}

/// Set every variable of `varmap` from `tensors` (by name); a missing one is an error.
pub fn set_from(varmap: &VarMap, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        match tensors.get(name) {
            Some(t) => var.set(t)?,
            None => candle_core::bail!("saved weights lack the variable {name}"),
        }
    }
    Ok(())
}
