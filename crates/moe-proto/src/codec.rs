//! The codec every generated service and client uses: prost encoding as usual, but a message
//! that does not decode (invalid UTF-8 in a string field, a truncated field, a wrong wire type)
//! is answered with INVALID_ARGUMENT naming the message and field, not INTERNAL. It is the
//! caller's input that is wrong, and a client should not retry it.

use prost::Message;
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;

/// Like `tonic_prost::ProstCodec`, with malformed input mapped to INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`, or says which field of which message is malformed.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(malformed)
    }
}

/// The status of a message that does not decode: the caller's fault, naming message and field.
fn malformed(e: prost::DecodeError) -> Status {
    Status::invalid_argument(format!("malformed message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_utf8_names_the_field() {
        // GenerateRequest.adapter_id (field 4, length-delimited) = b"\xff\xfe".
        let bytes = [0x22, 0x02, 0xff, 0xfe];
        let e = crate::v1::GenerateRequest::decode(&bytes[..]).expect_err("must fail");
        let status = malformed(e);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("adapter_id"), "{}", status.message());
        assert!(status.message().contains("UTF-8"), "{}", status.message());
    }
}
