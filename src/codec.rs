//! The gRPC codec of `sessioncache.v1`: prost's encoding, with buffers sized for this
//! service's messages. tonic gives every answer an 8 KiB encode buffer, and the answer's
//! bytes share it until they are sent: an answer waiting for a peer that does not read
//! (up to `--max-open-calls` of them) would hold 8 KiB for a message of a few hundred
//! bytes. A smaller first buffer grows as a larger message needs it.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Bytes first set aside to encode or decode a message: a Get's answer with a typical
/// user fits.
const BUFFER_BYTES: usize = 1024;
/// tonic's own: how much of a stream's answers is batched before it is sent.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// See the module's documentation.
#[derive(Debug, Clone)]
pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        SmallBuffers(PhantomData)
    }
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}
