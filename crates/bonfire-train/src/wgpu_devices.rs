//! Which wgpu devices a run trains on. Worker (or DP replica) `i` takes
//! device `i % n` of the list: the devices named by `--devices`, else every
//! GPU adapter the machine has when it has several, else the default device.
//! A CPU adapter (Mesa's lavapipe) is used only when named: on a machine
//! with one real GPU it would slow training down.

use anyhow::Result;
use burn::backend::wgpu::WgpuDevice;
use burn::tensor::backend::Backend;

/// Parses one `--devices` entry: `default`, `cpu`, `discrete:N`,
/// `integrated:N` or `virtual:N` (N counts adapters of that kind from 0).
pub fn parse(s: &str) -> Result<WgpuDevice, String> {
    let indexed = |kind: &str, make: fn(usize) -> WgpuDevice| {
        let n = s.strip_prefix(kind)?.strip_prefix(':')?;
        Some(n.parse().map(make).map_err(|_| format!("{s:?}: {n:?} is not an adapter number")))
    };
    match s {
        "default" => Ok(WgpuDevice::DefaultDevice),
        "cpu" => Ok(WgpuDevice::Cpu),
        _ => indexed("discrete", WgpuDevice::DiscreteGpu)
            .or_else(|| indexed("integrated", WgpuDevice::IntegratedGpu))
            .or_else(|| indexed("virtual", WgpuDevice::VirtualGpu))
            .unwrap_or_else(|| {
                Err(format!("{s:?} is not a wgpu device: use default, cpu, discrete:N, integrated:N or virtual:N"))
            }),
    }
}

/// The devices a run uses, each checked to work: `requested` if any,
/// otherwise the machine's GPU adapters when there are at least two.
pub fn choose(requested: &[WgpuDevice]) -> Result<Vec<WgpuDevice>> {
    check(&WgpuDevice::DefaultDevice)?;
    let devices = if requested.is_empty() { gpu_adapters() } else { requested.to_vec() };
    let devices = if devices.len() < 2 && requested.is_empty() { vec![WgpuDevice::DefaultDevice] } else { devices };
    for device in &devices {
        check(device)?;
    }
    Ok(devices)
}

/// wgpu panics when there is no adapter; turn that into a clear error.
pub fn check(device: &WgpuDevice) -> Result<()> {
    crate::guard::catch_panic(|| {
        burn::tensor::Tensor::<burn::backend::Wgpu, 1>::zeros([1], device).into_data();
    })
    .map_err(|panic| {
        let hint = if *device == WgpuDevice::DefaultDevice {
            "the wgpu backend found no usable GPU adapter; on Linux without a GPU install Mesa's lavapipe \
             (apt-get install mesa-vulkan-drivers libvulkan1)"
                .to_string()
        } else {
            format!("the wgpu device {device:?} is not available on this machine ({panic})")
        };
        crate::Unavailable(hint).into()
    })
}

/// Every discrete, integrated and virtual GPU adapter, in that order.
fn gpu_adapters() -> Vec<WgpuDevice> {
    // Burn's device type ids: 0 discrete, 1 integrated, 2 virtual, 3 CPU.
    let count = <burn::backend::Wgpu as Backend>::device_count;
    let discrete = (0..count(0)).map(WgpuDevice::DiscreteGpu);
    let integrated = (0..count(1)).map(WgpuDevice::IntegratedGpu);
    discrete.chain(integrated).chain((0..count(2)).map(WgpuDevice::VirtualGpu)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!(parse("default"), Ok(WgpuDevice::DefaultDevice));
        assert_eq!(parse("cpu"), Ok(WgpuDevice::Cpu));
        assert_eq!(parse("discrete:1"), Ok(WgpuDevice::DiscreteGpu(1)));
        assert_eq!(parse("integrated:0"), Ok(WgpuDevice::IntegratedGpu(0)));
        assert_eq!(parse("virtual:2"), Ok(WgpuDevice::VirtualGpu(2)));
        assert!(parse("discrete:x").unwrap_err().contains("not an adapter number"));
        assert!(parse("gpu0").unwrap_err().contains("use default, cpu"));
        assert!(parse("discrete").is_err());
    }
}
