//! Feeds arbitrary client bytes to the request scanner the way a session does: in chunks of
//! arbitrary size, resuming after each partial read. It must never panic, never claim bytes it
//! was not given, and find the same requests however the bytes were split; every request it
//! finds must walk back into exactly `argc` arguments and classify without panicking.
#![no_main]

use eden_sidecar::command::Command;
use eden_sidecar::frame::{Request, RequestScanner};
use libfuzzer_sys::fuzz_target;

/// Scans `input` delivered in chunks of `chunk` bytes; the requests found, or where it stopped.
fn scan(input: &[u8], chunk: usize) -> (Vec<Request>, bool) {
    let mut scanner = RequestScanner::default();
    let (mut requests, mut start, mut available) = (Vec::new(), 0, 0);
    while available < input.len() {
        available = (available + chunk).min(input.len());
        loop {
            match scanner.scan(&input[start..available]) {
                Ok(Some(request)) => {
                    assert!(request.len > 0 && start + request.len <= available, "claimed bytes it was not given");
                    assert!(request.name.end <= request.len);
                    let bytes = &input[start..available];
                    assert!(request.args(bytes).all(|arg| arg.end <= request.len));
                    assert_eq!(request.args(bytes).count(), request.argc);
                    let _ = Command::of(bytes, &request);
                    start += request.len;
                    requests.push(request);
                }
                Ok(None) => break,
                Err(_) => return (requests, true),
            }
        }
    }
    (requests, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else { return };
    let whole = scan(input, input.len().max(1));
    let pieces = scan(input, usize::from(chunk).max(1));
    assert_eq!(whole, pieces, "the split of the input changed what was found");
});
