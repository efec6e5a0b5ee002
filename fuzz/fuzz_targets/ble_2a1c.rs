#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| iomt_edge_fuzz::decode("ble/dev-1/2a1c", data));
