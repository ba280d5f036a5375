//! A small, stable, non-cryptographic hash (FNV-1a, 64-bit, with a final mix). Used for
//! snapshot versions and for consistent-hash load balancing, where every process must agree.

/// FNV-1a over `bytes`, finished with a 64-bit mixer so nearby inputs spread over the range.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
