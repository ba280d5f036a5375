//! `trellis.demo.v1.Echo`: replies name the server that answered; `fail_code` makes a call
//! fail with that status, so status trailers can be seen crossing the mesh.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("trellis.demo.v1");
}

pub use pb::echo_client::EchoClient;
pub use pb::echo_server::EchoServer;
pub use pb::{EchoReply, EchoRequest};

/// The service implementation.
#[derive(Clone, Debug)]
pub struct Echo {
    pub name: String,
}

fn check(req: &EchoRequest) -> Result<(), Status> {
    if req.fail_code != 0 {
        return Err(Status::new(tonic::Code::from(req.fail_code), format!("failed on request: {}", req.message)));
    }
    Ok(())
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl pb::echo_server::Echo for Echo {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let req = req.into_inner();
        check(&req)?;
        Ok(Response::new(EchoReply { message: req.message, server: self.name.clone(), index: 0 }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(&self, req: Request<EchoRequest>) -> Result<Response<ReplyStream>, Status> {
        let req = req.into_inner();
        check(&req)?;
        let server = self.name.clone();
        let out = tokio_stream::iter(0..req.count)
            .map(move |i| Ok(EchoReply { message: req.message.clone(), server: server.clone(), index: i }));
        Ok(Response::new(Box::pin(out)))
    }

    async fn client_stream(&self, req: Request<Streaming<EchoRequest>>) -> Result<Response<EchoReply>, Status> {
        let mut stream = req.into_inner();
        let mut parts = Vec::new();
        while let Some(r) = stream.next().await {
            let r = r?;
            check(&r)?;
            parts.push(r.message);
        }
        Ok(Response::new(EchoReply { message: parts.join(","), server: self.name.clone(), index: parts.len() as u32 }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(&self, req: Request<Streaming<EchoRequest>>) -> Result<Response<ReplyStream>, Status> {
        let server = self.name.clone();
        let mut i = 0u32;
        let out = req.into_inner().map(move |r| {
            let r = r?;
            check(&r)?;
            i += 1;
            Ok(EchoReply { message: r.message, server: server.clone(), index: i - 1 })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Serves the echo service on `listener` until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, name: &str) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(Echo { name: name.to_string() }))
        // TCP_NODELAY, as tonic's own `serve` sets: without it Nagle holds a response's
        // trailers until the client acknowledges its data (up to the 40 ms delayed ACK).
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
}
