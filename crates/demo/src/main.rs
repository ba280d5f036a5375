//! `trellis-demo`: the demo workloads, one subcommand each. They are ordinary programs: they
//! listen on `$PORT` (at `$BIND`, default 127.0.0.1), call other services by name through `HTTP_PROXY`, forward trace headers,
//! and log JSON lines. `trellis up` runs them (see `examples/`).
#![forbid(unsafe_code)]

/// mimalloc, not glibc's malloc: telemetry's idle-priority threads free what request threads
/// allocated (spans, log lines, received bodies), and a glibc `free` of another thread's block
/// takes that thread's arena lock: an idle thread preempted while holding it stalls the requests
/// behind it. mimalloc frees across threads without a lock (docs/ARCHITECTURE.md, "Memory").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "trellis-demo", about = "Demo workloads for Trellis")]
struct Cli {
    #[command(subcommand)]
    app: App,
}

#[derive(Subcommand)]
enum App {
    /// One of the reference platform's Services A–H (`SERVICE_NAME`, `GREETING`, `SERVICE_<X>_URL`).
    Reference,
    /// The color app's backend: answers `$COLOR`.
    Colorteller,
    /// The color app's front: `/color` asks a colorteller and reports the share of each color.
    Colorgateway,
    /// The DJ app's front: asks `metal` and `jazz` for artists.
    Dj,
    /// A genre service of the DJ app (`VERSION` v1 or v2).
    Artists {
        #[arg(long)]
        genre: String,
    },
    /// The tracing demo's front: `/fast` and `/slow` ask `business-logic`.
    Frontend,
    /// The tracing demo's backend: `/slow` spends ~3 s in a span named `data_transformation`.
    BusinessLogic,
    /// A gRPC echo server (`trellis.demo.v1.Echo`) on `$PORT`.
    GrpcEcho {
        #[arg(long, default_value = "echo")]
        name: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.app {
        App::Reference => trellis_demo::reference::run().await,
        App::Colorteller => trellis_demo::color::teller().await,
        App::Colorgateway => trellis_demo::color::gateway().await,
        App::Dj => trellis_demo::dj::dj().await,
        App::Frontend => trellis_demo::slowfast::frontend().await,
        App::BusinessLogic => trellis_demo::slowfast::business_logic().await,
        App::Artists { genre } => trellis_demo::dj::genre(genre).await,
        App::GrpcEcho { name } => {
            let port = trellis_demo::web::port(50051);
            match tokio::net::TcpListener::bind((trellis_demo::web::bind_ip(), port)).await {
                Ok(l) => trellis_demo::echo::serve(l, &name).await.map_err(std::io::Error::other),
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
