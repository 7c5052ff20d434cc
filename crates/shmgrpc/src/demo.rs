//! The demo blob service: echo, upload, download and their streaming variants, with every payload checksummed.
//!
//! Used by `shmgrpc serve` / `shmgrpc call`, the README and the tests. Built with [`crate::ShmCodec`], so it moves
//! large payloads through shared memory under [`crate::ShmServer`] and [`crate::ShmChannel`], and is a plain gRPC
//! service otherwise.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub use crate::proto::demo::blob_client::BlobClient;
pub use crate::proto::demo::blob_server::{Blob, BlobServer};
pub use crate::proto::demo::{Digest, DigestList, DownloadRequest, Payload};

/// Largest payload `download` agrees to produce.
pub const MAX_DOWNLOAD: u64 = 4 << 30;

/// Fills `buf` with a pattern derived from `seed`, a word at a time (memory-bound, like a real payload write).
pub fn fill_pattern(buf: &mut [u8], seed: u32) {
    let mut chunks = buf.chunks_exact_mut(8);
    let base = u64::from(seed).wrapping_mul(0x0101_0101_0101_0101) | 1;
    for (i, c) in (&mut chunks).enumerate() {
        c.copy_from_slice(&(base ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
    }
    chunks.into_remainder().fill(seed as u8);
}

/// A payload of `size` pattern bytes with its checksum.
pub fn payload(size: usize, seed: u32) -> Payload {
    let mut data = vec![0u8; size];
    fill_pattern(&mut data, seed);
    Payload { crc32: crc32fast::hash(&data), data: Bytes::from(data), note: String::new() }
}

/// Checks a payload against its checksum.
pub fn verify(p: &Payload) -> Result<(), Status> {
    let got = crc32fast::hash(&p.data);
    if got != p.crc32 {
        return Err(Status::data_loss(format!("checksum mismatch: payload says {:#x}, data is {got:#x}", p.crc32)));
    }
    Ok(())
}

fn digest(p: &Payload) -> Result<Digest, Status> {
    verify(p)?;
    Ok(Digest { len: p.data.len() as u64, crc32: p.crc32, via_shm: crate::session::is_shared(&p.data) })
}

/// The blob service.
#[derive(Debug, Default, Clone)]
pub struct BlobService;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn download_size(r: &DownloadRequest) -> Result<usize, Status> {
    if r.size > MAX_DOWNLOAD {
        return Err(Status::invalid_argument(format!("size {} is above the limit of {MAX_DOWNLOAD}", r.size)));
    }
    Ok(r.size as usize)
}

#[tonic::async_trait]
impl Blob for BlobService {
    async fn echo(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let p = request.into_inner();
        verify(&p)?;
        Ok(Response::new(p))
    }

    async fn upload(&self, request: Request<Payload>) -> Result<Response<Digest>, Status> {
        Ok(Response::new(digest(&request.into_inner())?))
    }

    async fn download(&self, request: Request<DownloadRequest>) -> Result<Response<Payload>, Status> {
        let r = request.into_inner();
        Ok(Response::new(payload(download_size(&r)?, r.seed)))
    }

    async fn upload_stream(&self, request: Request<Streaming<Payload>>) -> Result<Response<DigestList>, Status> {
        let mut stream = request.into_inner();
        let mut digests = Vec::new();
        while let Some(p) = stream.next().await {
            digests.push(digest(&p?)?);
        }
        Ok(Response::new(DigestList { digests }))
    }

    type DownloadStreamStream = BoxStream<Payload>;

    async fn download_stream(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStreamStream>, Status> {
        let r = request.into_inner();
        let size = download_size(&r)?;
        let stream = futures_util::stream::iter(0..r.count).map(move |i| Ok(payload(size, r.seed.wrapping_add(i))));
        Ok(Response::new(Box::pin(stream)))
    }

    type EchoStreamStream = BoxStream<Payload>;

    async fn echo_stream(
        &self,
        request: Request<Streaming<Payload>>,
    ) -> Result<Response<Self::EchoStreamStream>, Status> {
        let stream = request.into_inner().map(|p| {
            let p = p?;
            verify(&p)?;
            Ok(p)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
