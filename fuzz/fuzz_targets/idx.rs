//! An images file and a labels file in IDX format, raw or gzipped. The first
//! byte says where the input is cut in two.
#![no_main]

use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let cut = cut as usize * rest.len() / 255;
    let (images, labels) = rest.split_at(cut);
    let _ = bonfire_data::idx::parse_images_and_labels(
        Path::new("images"),
        images.to_vec(),
        Path::new("labels"),
        labels.to_vec(),
    );
});
