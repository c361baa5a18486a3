//! Generates the gRPC code from `kerwen/v1/*.proto` with the pure-Rust `protox` compiler, so
//! building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["kerwen/v1/exchange.proto", "kerwen/v1/admin.proto", "kerwen/v1/access.proto", "kerwen/v1/internal.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .bytes(".kerwen.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
