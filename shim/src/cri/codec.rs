//! gRPC framing for rust-protobuf messages: tonic's codec trait over `write_to_bytes` and
//! `parse_from_bytes` (tonic's own codecs are for prost).

use std::marker::PhantomData;

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Encodes `E` requests and decodes `D` replies.
pub struct ProtobufCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for ProtobufCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<E, D> Codec for ProtobufCodec<E, D>
where
    E: protobuf::Message + Send + 'static,
    D: protobuf::Message + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = MessageEncoder<E>;
    type Decoder = MessageDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        MessageEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
    }
}

pub struct MessageEncoder<E>(PhantomData<fn(E)>);

impl<E: protobuf::Message> Encoder for MessageEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let bytes = item
            .write_to_bytes()
            .map_err(|e| Status::internal(format!("cannot encode a CRI request: {e}")))?;
        dst.put_slice(&bytes);
        Ok(())
    }
}

pub struct MessageDecoder<D>(PhantomData<fn() -> D>);

impl<D: protobuf::Message> Decoder for MessageDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        D::parse_from_bytes(&bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("cannot decode a CRI reply: {e}")))
    }
}
