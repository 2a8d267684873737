//! Smoke tests for the benchmark and info functions (tiny sizes), plus the real measurement,
//! ignored by default: `cargo test --release --test model_bench -- --ignored --nocapture`.

use candle_core::Device;
use onehead::bench::{bench_inference, bench_train_step};
use onehead::model::info::info_report_with_runs;
use onehead::model::OneHeadConfig;

#[test]
fn bench_and_info_run_on_tiny_inputs() {
    let r = bench_train_step(32, 2, 1, &Device::Cpu).unwrap();
    assert!(r.ms_per_step > 0.0 && r.images_per_sec > 0.0);
    let r = bench_inference(32, 1, 1, &Device::Cpu).unwrap();
    assert_eq!(r.batch, 1);
    let info = info_report_with_runs(&OneHeadConfig::default(), 64, &Device::Cpu, 2).unwrap();
    assert_eq!(info.params.total, 1_605_582);
    // fpn.layer_blocks.1 and .2 (3×3, 128 → 128, with bias) feed nothing.
    assert_eq!(info.params.unused, 2 * (128 * 128 * 9 + 128));
    assert_eq!(info.params.used(), 1_310_414);
    let text = info.to_string();
    assert!(
        text.contains("[1, 46, 8, 8]") && text.contains("1310414"),
        "{text}"
    );
}

#[test]
#[ignore = "measurement: run alone, in release, on an idle machine"]
fn measure_throughput() {
    let dev = Device::Cpu;
    for size in [224, 160] {
        let r = bench_inference(size, 1, 30, &dev).unwrap();
        println!("inference latency {r}");
    }
    let r = bench_inference(224, 16, 5, &dev).unwrap();
    println!("inference throughput {r}");
    for size in [160, 224] {
        let r = bench_train_step(size, 16, 5, &dev).unwrap();
        println!("training {r}");
    }
}
