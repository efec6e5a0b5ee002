#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| iomt_edge_fuzz::decode("fhir/dev-1", data));
