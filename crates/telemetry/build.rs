//! Compiles the OTLP trace and log messages with protox (pure Rust), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/otlp_trace.proto", "proto/otlp_logs.proto", "proto/otlp_receive.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        // The receiver's bytes fields are slices of the body received (`bytes::Bytes`), not copies.
        .bytes(".trellis.otlp.receive")
        .compile_fds(fds)?;
    Ok(())
}
