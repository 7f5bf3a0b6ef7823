//! Whatever a stranger sends the rendezvous store: frames of requests, read
//! and decoded exactly as the server does. Must never panic or allocate
//! beyond the frame limit.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bonfire_collective::decode_connection(data);
});
