//! The network benchmark's probe, built static into the `netprobe` test image
//! (scripts/build-test-images.sh --only netprobe) and run inside pods:
//!
//! - `netprobe serve PORT`: a TCP server. A connection's first byte picks its mode: `e`
//!   echoes every byte back (round trips), `s` swallows everything and, at the sender's
//!   end of stream, answers with the byte count as 8 little-endian bytes (throughput).
//! - `netprobe rr HOST PORT N`: N one-byte round trips over one connection; prints
//!   `{"round_trips":N,"p50_us":..,"p90_us":..}`.
//! - `netprobe stream HOST PORT BYTES`: sends BYTES through one connection; prints
//!   `{"bytes":..,"seconds":..,"mbit_s":..}` once the server confirmed it got them all.
//!
//! Standard library only, so that the image is one small static binary.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["serve", port] => serve(port),
        ["rr", host, port, n] => round_trips(host, port, n),
        ["stream", host, port, bytes] => stream(host, port, bytes),
        _ => Err("usage: netprobe serve PORT | rr HOST PORT N | stream HOST PORT BYTES".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netprobe: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn connect(host: &str, port: &str) -> Result<TcpStream> {
    // An IPv6 literal comes bare; the socket address wants it in brackets.
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let target = address
        .to_socket_addrs()?
        .next()
        .ok_or("no address to connect to")?;
    let stream = TcpStream::connect(target)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn serve(port: &str) -> Result<()> {
    let listener = TcpListener::bind(format!("[::]:{port}"))
        .or_else(|_| TcpListener::bind(format!("0.0.0.0:{port}")))?;
    println!("netprobe serving on port {port}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let _ = handle(stream);
        });
    }
    Ok(())
}

fn handle(mut stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode)?;
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if mode[0] == b'e' {
            stream.write_all(&buffer[..n])?;
        }
    }
    if mode[0] == b's' {
        stream.write_all(&total.to_le_bytes())?;
    }
    Ok(())
}

fn round_trips(host: &str, port: &str, n: &str) -> Result<()> {
    let n: usize = n.parse()?;
    let mut stream = connect(host, port)?;
    stream.write_all(b"e")?;
    let mut byte = [0u8; 1];
    let mut micros = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        stream.write_all(b"x")?;
        stream.read_exact(&mut byte)?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    let at = |p: f64| micros[((p / 100.0) * (micros.len() as f64 - 1.0)).round() as usize];
    println!(
        "{{\"round_trips\":{n},\"p50_us\":{:.1},\"p90_us\":{:.1}}}",
        at(50.0),
        at(90.0)
    );
    Ok(())
}

fn stream(host: &str, port: &str, bytes: &str) -> Result<()> {
    let bytes: u64 = bytes.parse()?;
    let mut stream = connect(host, port)?;
    stream.write_all(b"s")?;
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count)?;
    let seconds = started.elapsed().as_secs_f64();
    let received = u64::from_le_bytes(count);
    if received != bytes {
        return Err(format!("the server got {received} of {bytes} bytes").into());
    }
    println!(
        "{{\"bytes\":{bytes},\"seconds\":{seconds:.3},\"mbit_s\":{:.1}}}",
        bytes as f64 * 8.0 / seconds / 1e6
    );
    Ok(())
}
