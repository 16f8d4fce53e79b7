//! A relay that does nothing but pass bytes on: the floor under any proxy's throughput on
//! this machine (`bench/consume --floor` runs it on the testbed's FAR listener). Two blocking
//! threads a connection, one per direction, no runtime, no parsing.
//!
//! - `copy`: read into a 1 MiB buffer and write it out: what any proxy that looks at the
//!   bytes pays (the kernel copies them into user space and back out).
//! - `splice`: splice(2) socket → pipe → socket: the bytes never enter user space, what a
//!   proxy that never looks at record bytes could do at best.
//!
//!   byte_relay copy|splice LISTEN_PORT TARGET_PORT   (a server: runs until killed)

#[path = "support/pump.rs"]
mod pump;

use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

const CHUNK: usize = 1 << 20;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [mode, listen, target] = args.as_slice() else {
        eprintln!("usage: byte_relay copy|splice LISTEN_PORT TARGET_PORT");
        std::process::exit(2);
    };
    let splice = match mode.as_str() {
        "copy" => false,
        "splice" => true,
        _ => {
            eprintln!("mode must be copy or splice");
            std::process::exit(2);
        }
    };
    let target: u16 = target.parse().expect("TARGET_PORT");
    let listener = TcpListener::bind(("127.0.0.1", listen.parse::<u16>().expect("LISTEN_PORT")))
        .expect("bind");
    for client in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let up = std::thread::spawn(move || pump(splice, c2, u2));
            pump(splice, upstream, client);
            let _ = up.join();
        });
    }
}

fn pump(splice: bool, from: TcpStream, to: TcpStream) {
    if splice {
        pump_splice(&from, &to);
        let _ = to.shutdown(Shutdown::Write);
    } else {
        pump::copy(from.try_clone().expect("clone"), to, CHUNK);
    }
    let _ = from.shutdown(Shutdown::Read);
}

fn pump_splice(from: &TcpStream, to: &TcpStream) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe() writes two descriptors into the array it is given.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    let (r, w) = (fds[0], fds[1]);
    // SAFETY: plain syscalls on descriptors this function owns (the pipe) or borrows (the
    // sockets, alive for the whole call); a failed call ends the loop.
    unsafe {
        libc::fcntl(w, libc::F_SETPIPE_SZ, CHUNK as libc::c_int);
        'outer: loop {
            let n = libc::splice(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                w,
                std::ptr::null_mut(),
                CHUNK,
                libc::SPLICE_F_MOVE,
            );
            if n <= 0 {
                break;
            }
            let mut left = n as usize;
            while left > 0 {
                let m = libc::splice(
                    r,
                    std::ptr::null_mut(),
                    to.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE,
                );
                if m <= 0 {
                    break 'outer;
                }
                left -= m as usize;
            }
        }
        libc::close(r);
        libc::close(w);
    }
}
