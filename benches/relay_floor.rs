//! The floor under any proxy's added latency on this machine: a 1 KiB request / 1 KiB answer
//! ping-pong over loopback, straight to an echo server vs through a relay that does nothing
//! but copy bytes (two relays: tokio's `copy_bidirectional` on a 2-worker runtime, as a
//! proxy built on tokio would at best, and two blocking threads, the kernel's own wake-ups
//! and nothing else). Rounds alternate direct and relayed; medians of the per-round p50s.
//! No Kafka: the echo answers at once, so what the relay adds is two extra loopback hops and
//! the wake-ups of the threads that carry them.
//!
//!   cargo bench --bench relay_floor -- [ROUNDS] [SAMPLES] [ECHO_SLEEP_US]   (defaults 5, 5000, 0)

#[path = "support/pump.rs"]
mod pump;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const SIZE: usize = 1024;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(5);
    let samples = args.get(1).copied().unwrap_or(5000);
    let delay = Duration::from_micros(args.get(2).copied().unwrap_or(0) as u64);
    let echo = echo_server(delay);
    let tokio_relay = tokio_relay(echo);
    let thread_relay = thread_relay(echo);
    let targets = [
        ("direct", echo),
        ("tokio relay", tokio_relay),
        ("thread relay", thread_relay),
    ];
    let mut p50s: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for r in 0..rounds {
        for k in 0..targets.len() {
            // Rotate which target goes first each round.
            let i = (k + r) % targets.len();
            let (name, addr) = targets[i];
            let p = ping_pong(addr, samples);
            println!("round {} {name}: p50 {:.0} µs", r + 1, p);
            p50s[i].push(p);
        }
    }
    let direct = median(&mut p50s[0].clone());
    for (i, (name, _)) in targets.iter().enumerate() {
        let m = median(&mut p50s[i]);
        println!("median p50 {name}: {m:.0} µs (added {:+.0} µs)", m - direct);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ping_pong(addr: SocketAddr, n: usize) -> f64 {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let out = [7u8; SIZE];
    let mut back = [0u8; SIZE];
    for _ in 0..200 {
        s.write_all(&out).expect("write");
        s.read_exact(&mut back).expect("read");
    }
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        s.write_all(&out).expect("write");
        s.read_exact(&mut back).expect("read");
        t.push(start.elapsed());
    }
    t.sort();
    t[n / 2].as_secs_f64() * 1e6
}

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Answers each 1 KiB read with 1 KiB, one thread per connection, after sleeping `delay`
/// (a broker's work: the threads on the path then go idle as they do in front of Kafka).
fn echo_server(delay: Duration) -> SocketAddr {
    let (l, addr) = listener();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                s.set_nodelay(true).ok();
                let mut buf = [0u8; SIZE];
                while s.read_exact(&mut buf).is_ok() {
                    if !delay.is_zero() {
                        std::thread::sleep(delay);
                    }
                    if s.write_all(&buf).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn tokio_relay(to: SocketAddr) -> SocketAddr {
    let (l, addr) = listener();
    l.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).expect("listener");
            loop {
                let Ok((mut c, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(mut u) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    c.set_nodelay(true).ok();
                    u.set_nodelay(true).ok();
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                });
            }
        });
    });
    addr
}

fn thread_relay(to: SocketAddr) -> SocketAddr {
    let (l, addr) = listener();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let Ok(u) = TcpStream::connect(to) else {
                continue;
            };
            c.set_nodelay(true).ok();
            u.set_nodelay(true).ok();
            let (c2, u2) = (c.try_clone().expect("clone"), u.try_clone().expect("clone"));
            std::thread::spawn(move || pipe(c, u));
            std::thread::spawn(move || pipe(u2, c2));
        }
    });
    addr
}

fn pipe(from: TcpStream, to: TcpStream) {
    pump::copy(from, to, 64 * 1024);
}
