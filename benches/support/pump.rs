//! The byte pump the relay benches share: read what arrives, write it on, until either side
//! closes; then close the write half so the far side sees the end.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

/// Copies `from` → `to` through a `chunk`-byte buffer in user space.
pub fn copy(mut from: TcpStream, mut to: TcpStream, chunk: usize) {
    let mut buf = vec![0u8; chunk];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
