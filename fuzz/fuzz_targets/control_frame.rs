//! Fuzzes the agent's control-message reader with whatever a peer could send on the control
//! connection: `read_message::<SourceMessage>` over arbitrary bytes (length prefix included)
//! must never panic, must refuse every length over `MAX_FRAME` as `FrameTooLarge`, and whatever
//! decodes must encode again.
//!
//! Run: `cargo +nightly fuzz run control_frame` in `fuzz/`.

#![no_main]

use std::sync::OnceLock;

use ferry::protocol::{self, ProtocolError, SourceMessage, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    let result = runtime().block_on(protocol::read_message::<_, SourceMessage>(&mut reader));
    let announced = data
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
    match result {
        Err(ProtocolError::FrameTooLarge { len }) => {
            assert!(len > MAX_FRAME);
            assert_eq!(Some(len), announced);
        }
        Ok(message) => {
            assert!(announced.is_some_and(|l| l <= MAX_FRAME));
            let body = serde_json::to_vec(&message).expect("a decoded message encodes");
            assert!(protocol::decode::<SourceMessage>(&body).is_ok());
        }
        Err(_) => {
            if let Some(len) = announced {
                assert!(len <= MAX_FRAME || data.len() < 4);
            }
        }
    }
});
