//! One CIFAR-10 binary batch file.
#![no_main]

use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    let _ = bonfire_data::cifar::parse_records(Path::new("data_batch_1.bin"), data, &mut pixels, &mut labels);
});
