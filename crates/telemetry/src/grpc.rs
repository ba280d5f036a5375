//! Counting gRPC messages in a body as it streams: each message is a 5-byte prefix
//! (compressed flag, 32-bit big-endian length) and its payload, split across data frames
//! anywhere. Feeds `istio_request_messages_total` and `istio_response_messages_total`.

/// Streaming message counter.
#[derive(Clone, Debug, Default)]
pub struct MessageCounter {
    prefix: [u8; 5],
    prefix_len: usize,
    payload_left: u64,
    pub messages: u64,
}

impl MessageCounter {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left as usize).min(data.len());
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                self.messages += 1;
                self.payload_left =
                    u64::from(u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]));
                self.prefix_len = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_messages_split_anywhere() {
        let mut wire = Vec::new();
        for payload in [&b"hello"[..], b"", b"a longer message payload"] {
            wire.push(0);
            wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            wire.extend_from_slice(payload);
        }
        for chunk in 1..wire.len() {
            let mut c = MessageCounter::default();
            for part in wire.chunks(chunk) {
                c.feed(part);
            }
            assert_eq!(c.messages, 3, "chunk size {chunk}");
        }
    }
}
