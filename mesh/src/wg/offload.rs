//! TUN offload arithmetic, pure (no IO): the `virtio_net_hdr` a TUN opened
//! with `IFF_VNET_HDR` puts before every packet, Internet checksums,
//! segmentation of the TCP super-packets the kernel hands us once TSO is
//! on (what the NIC would do), and coalescing of received TCP segments of
//! one flow into one super-packet for the kernel (what GRO would do).
//!
//! Same rules as the kernel's `tcp_gso_segment`/`tcp_gro_receive` and
//! wireguard-go's `tun/offload_linux.go`, reduced to TCP over IPv4 without
//! options-bearing IP headers and IPv6 without extension headers; any other
//! packet passes through untouched.

use std::io::IoSlice;

/// `sizeof(struct virtio_net_hdr)`.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: checksum from `csum_start` still to do.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;
/// Largest IP packet we build or accept from the kernel.
pub const MAX_SUPER: usize = 65_535;
/// Segments coalesced into one super-packet at most.
pub const MAX_SEGS: usize = 64;

const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

/// `struct virtio_net_hdr` (little-endian fields: x86/arm hosts; the TUN
/// uses native order unless told otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// A packet the offload code cannot make sense of; the caller drops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("checksum offsets outside the packet")]
    CsumOffsets,
    #[error("GSO packet that is not TCP over IPv4/IPv6")]
    NotTcp,
    #[error("truncated header")]
    Truncated,
    #[error("GSO size 0")]
    GsoSize,
    #[error("segment larger than the buffer")]
    TooLarge,
}

/// One's-complement sum of `data` (big-endian 16-bit words) added to `acc`;
/// not folded. Any number of calls may be chained as long as every chunk
/// but the last has even length.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut rest = words.remainder();
    if rest.len() >= 2 {
        acc += u64::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    if let Some(&b) = rest.first() {
        acc += u64::from(b) << 8;
    }
    acc
}

/// Fold a [`sum`] to 16 bits (not inverted).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Sum of the TCP/UDP pseudo-header (IPv4 or IPv6 addresses by length).
pub fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    let acc = sum(dst, sum(src, 0));
    acc + u64::from(proto) + len as u64
}

/// Finish a checksum the kernel left partial (`F_NEEDS_CSUM`): the field
/// at `csum_start + csum_offset` holds the pseudo-header sum.
pub fn finish_checksum(hdr: &VnetHdr, pkt: &mut [u8]) -> Result<(), Malformed> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if start >= pkt.len() || at + 2 > pkt.len() {
        return Err(Malformed::CsumOffsets);
    }
    let c = !fold(sum(&pkt[start..], 0));
    // UDP transmits an all-zero result as all-ones (0 means "none").
    let c = if c == 0 && hdr.csum_offset == 6 {
        0xffff
    } else {
        c
    };
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

fn ipv4_header_checksum(ip: &mut [u8]) {
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = !fold(sum(ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Where the IP and TCP headers of a TCP packet end: `(ip_len, tcp_len)`.
fn tcp_headers(pkt: &[u8]) -> Option<(usize, usize, bool)> {
    let (ip_len, v6) = match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if ihl < 20 || pkt.len() < ihl || pkt[9] != PROTO_TCP {
                return None;
            }
            (ihl, false)
        }
        6 => {
            if pkt.len() < 40 || pkt[6] != PROTO_TCP {
                return None;
            }
            (40, true)
        }
        _ => return None,
    };
    let doff = usize::from(*pkt.get(ip_len + 12)? >> 4) * 4;
    if doff < 20 || pkt.len() < ip_len + doff {
        return None;
    }
    Some((ip_len, doff, v6))
}

fn tcp_checksum(pkt: &mut [u8], ip_len: usize, v6: bool) {
    let seg = pkt.len() - ip_len;
    let ps = if v6 {
        pseudo_sum(&pkt[8..24], &pkt[24..40], PROTO_TCP, seg)
    } else {
        pseudo_sum(&pkt[12..16], &pkt[16..20], PROTO_TCP, seg)
    };
    let at = ip_len + 16;
    pkt[at..at + 2].copy_from_slice(&[0, 0]);
    let c = !fold(sum(&pkt[ip_len..], ps));
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Split a TCP super-packet (`gso_type` TCPV4/TCPV6) into segments of at
/// most `gso_size` payload bytes, each a complete packet with its own IP
/// length, IPv4 id and header checksum, TCP sequence number and checksum,
/// built in `scratch` and handed to `emit`. Returns the segment count.
pub fn tcp_segment(
    hdr: &VnetHdr,
    pkt: &[u8],
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, Malformed> {
    let (ip_len, tcp_len, v6) = tcp_headers(pkt).ok_or(Malformed::NotTcp)?;
    let want_v6 = hdr.gso_type & !GSO_ECN == GSO_TCPV6;
    if v6 != want_v6 {
        return Err(Malformed::NotTcp);
    }
    let gso = usize::from(hdr.gso_size);
    if gso == 0 {
        return Err(Malformed::GsoSize);
    }
    let head = ip_len + tcp_len;
    if head + gso > scratch.len() {
        return Err(Malformed::TooLarge);
    }
    let payload = &pkt[head..];
    let seq0 = u32::from_be_bytes(pkt[ip_len + 4..ip_len + 8].try_into().expect("4 bytes"));
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let flags0 = pkt[ip_len + 13];
    let count = payload.len().div_ceil(gso).max(1);
    for i in 0..count {
        let chunk = &payload[(i * gso).min(payload.len())..((i + 1) * gso).min(payload.len())];
        let n = head + chunk.len();
        let out = &mut scratch[..n];
        out[..head].copy_from_slice(&pkt[..head]);
        out[head..].copy_from_slice(chunk);
        if v6 {
            out[4..6].copy_from_slice(&((n - 40) as u16).to_be_bytes());
        } else {
            out[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            out[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            ipv4_header_checksum(&mut out[..ip_len]);
        }
        let seq = seq0.wrapping_add((i * gso) as u32);
        out[ip_len + 4..ip_len + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 < count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        out[ip_len + 13] = flags;
        tcp_checksum(out, ip_len, v6);
        emit(out);
    }
    Ok(count)
}

/// A TCP flow as GRO sees it: addresses, ports, family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    src: [u8; 16],
    dst: [u8; 16],
    ports: [u8; 4],
    v6: bool,
}

#[derive(Debug, Default)]
struct Item {
    /// The first packet: `buf[start..start + len]`.
    start: usize,
    len: usize,
    flow: Option<Flow>,
    ip_len: usize,
    tcp_len: usize,
    gso_size: usize,
    next_seq: u32,
    /// Bytes of the coalesced packet so far (headers + all payload).
    total: usize,
    closed: bool,
    psh: bool,
    /// Payload ranges appended after the first packet.
    segs: Vec<(usize, usize)>,
}

/// Receive-side coalescing over one batch of decrypted packets that live
/// in one buffer: [`Gro::push`] each packet (offset and length into the
/// buffer, in arrival order), then [`Gro::flush`] writes every resulting
/// packet once, with the `virtio_net_hdr` that tells the kernel what it is.
#[derive(Debug, Default)]
pub struct Gro {
    items: Vec<Item>,
    n: usize,
}

/// Which items a flow may still grow: only its newest one.
const LOOKBACK: usize = 32;

impl Gro {
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn new_item(&mut self) -> &mut Item {
        if self.n == self.items.len() {
            self.items.push(Item::default());
        }
        let it = &mut self.items[self.n];
        self.n += 1;
        it.segs.clear();
        it.flow = None;
        it.closed = true;
        it.psh = false;
        it
    }

    /// Add `buf[start..start + len]`, a whole IP packet.
    pub fn push(&mut self, buf: &[u8], start: usize, len: usize) {
        let pkt = &buf[start..start + len];
        let Some(c) = Candidate::parse(pkt) else {
            let it = self.new_item();
            it.start = start;
            it.len = len;
            return;
        };
        let lo = self.n.saturating_sub(LOOKBACK);
        if let Some(idx) = (lo..self.n)
            .rev()
            .find(|&i| self.items[i].flow == Some(c.flow))
        {
            let it = &self.items[idx];
            if !it.closed && it.can_append(buf, pkt, &c) {
                let it = &mut self.items[idx];
                let payload = len - c.head;
                it.segs.push((start + c.head, payload));
                it.total += payload;
                it.next_seq = c.seq.wrapping_add(payload as u32);
                if c.flags & TCP_PSH != 0 {
                    it.psh = true;
                    it.closed = true;
                }
                if payload < it.gso_size || it.segs.len() + 1 >= MAX_SEGS {
                    it.closed = true;
                }
                return;
            }
        }
        let it = self.new_item();
        it.start = start;
        it.len = len;
        it.flow = Some(c.flow);
        it.ip_len = c.ip_len;
        it.tcp_len = c.head - c.ip_len;
        it.gso_size = len - c.head;
        it.next_seq = c.seq.wrapping_add(it.gso_size as u32);
        it.total = len;
        it.closed = c.flags & TCP_PSH != 0;
    }

    /// Write out every packet (fixing the headers of coalesced ones in
    /// `buf`) through `write`, which gets the vnet header and the pieces
    /// of one packet; then start over.
    pub fn flush(&mut self, buf: &mut [u8], mut write: impl FnMut(&[IoSlice<'_>])) {
        for k in 0..self.n {
            let it = &self.items[k];
            let mut hdr = VnetHdr::default();
            if !it.segs.is_empty() {
                let (ip_len, v6) = (it.ip_len, it.flow.is_some_and(|f| f.v6));
                let p = &mut buf[it.start..it.start + it.len];
                if v6 {
                    p[4..6].copy_from_slice(&((it.total - 40) as u16).to_be_bytes());
                } else {
                    p[2..4].copy_from_slice(&(it.total as u16).to_be_bytes());
                    ipv4_header_checksum(&mut p[..ip_len]);
                }
                if it.psh {
                    p[ip_len + 13] |= TCP_PSH;
                }
                // CHECKSUM_PARTIAL: the field holds the pseudo-header sum.
                let seg = it.total - ip_len;
                let ps = if v6 {
                    pseudo_sum(&p[8..24], &p[24..40], PROTO_TCP, seg)
                } else {
                    pseudo_sum(&p[12..16], &p[16..20], PROTO_TCP, seg)
                };
                p[ip_len + 16..ip_len + 18].copy_from_slice(&fold(ps).to_be_bytes());
                hdr = VnetHdr {
                    flags: F_NEEDS_CSUM,
                    gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                    hdr_len: (ip_len + it.tcp_len) as u16,
                    gso_size: it.gso_size as u16,
                    csum_start: ip_len as u16,
                    csum_offset: 16,
                };
            }
            let h = hdr.encode();
            let mut iov = [IoSlice::new(&[]); MAX_SEGS + 2];
            iov[0] = IoSlice::new(&h);
            iov[1] = IoSlice::new(&buf[it.start..it.start + it.len]);
            for (j, &(s, l)) in it.segs.iter().enumerate() {
                iov[j + 2] = IoSlice::new(&buf[s..s + l]);
            }
            write(&iov[..it.segs.len() + 2]);
        }
        self.n = 0;
    }
}

/// A TCP segment that GRO may merge: pure ACK (maybe PSH) with payload.
struct Candidate {
    flow: Flow,
    ip_len: usize,
    head: usize,
    seq: u32,
    flags: u8,
}

impl Candidate {
    fn parse(pkt: &[u8]) -> Option<Candidate> {
        let (ip_len, tcp_len, v6) = tcp_headers(pkt)?;
        let mut flow = Flow {
            src: [0; 16],
            dst: [0; 16],
            ports: [0; 4],
            v6,
        };
        if v6 {
            if usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) + 40 != pkt.len() {
                return None;
            }
            flow.src.copy_from_slice(&pkt[8..24]);
            flow.dst.copy_from_slice(&pkt[24..40]);
        } else {
            // Options in the IP header, fragments or a length that does
            // not match: leave it alone.
            let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
            if ip_len != 20
                || frag & 0x3fff != 0
                || usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len()
            {
                return None;
            }
            flow.src[..4].copy_from_slice(&pkt[12..16]);
            flow.dst[..4].copy_from_slice(&pkt[16..20]);
        }
        flow.ports.copy_from_slice(&pkt[ip_len..ip_len + 4]);
        let flags = pkt[ip_len + 13];
        let head = ip_len + tcp_len;
        if flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_URG | TCP_ECE | TCP_CWR) != 0
            || flags & TCP_ACK == 0
            || pkt.len() == head
        {
            return None;
        }
        let seq = u32::from_be_bytes(pkt[ip_len + 4..ip_len + 8].try_into().ok()?);
        Some(Candidate {
            flow,
            ip_len,
            head,
            seq,
            flags,
        })
    }
}

impl Item {
    fn can_append(&self, buf: &[u8], pkt: &[u8], c: &Candidate) -> bool {
        let first = &buf[self.start..self.start + self.len];
        let payload = pkt.len() - c.head;
        if c.seq != self.next_seq
            || c.ip_len != self.ip_len
            || c.head != self.ip_len + self.tcp_len
            || payload > self.gso_size
            || self.total + payload > MAX_SUPER
            || self.segs.len() + 1 >= MAX_SEGS
        {
            return false;
        }
        // IP fields that must match: v4 TOS, flags (DF), TTL; v6 traffic
        // class, flow label, hop limit.
        let ip_same = if c.flow.v6 {
            first[..4] == pkt[..4] && first[7] == pkt[7]
        } else {
            first[1] == pkt[1] && first[6] & 0xe0 == pkt[6] & 0xe0 && first[8] == pkt[8]
        };
        let t = self.ip_len;
        // Same ack number, data offset, window, and options (timestamps).
        ip_same
            && first[t + 8..t + 12] == pkt[t + 8..t + 12]
            && first[t + 12] == pkt[t + 12]
            && first[t + 14..t + 16] == pkt[t + 14..t + 16]
            && first[t + 20..c.head] == pkt[t + 20..c.head]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071, the obvious way.
    fn reference_checksum(chunks: &[&[u8]]) -> u16 {
        let data: Vec<u8> = chunks.concat();
        let mut s: u32 = 0;
        for w in data.chunks(2) {
            let v = if w.len() == 2 {
                u32::from(w[0]) << 8 | u32::from(w[1])
            } else {
                u32::from(w[0]) << 8
            };
            s += v;
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
        }
        !(s as u16)
    }

    fn pseudo(pkt: &[u8], v6: bool) -> Vec<u8> {
        let (src, dst, len) = if v6 {
            (&pkt[8..24], &pkt[24..40], pkt.len() - 40)
        } else {
            let ihl = usize::from(pkt[0] & 15) * 4;
            (&pkt[12..16], &pkt[16..20], pkt.len() - ihl)
        };
        let mut p = src.to_vec();
        p.extend_from_slice(dst);
        if v6 {
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 6]);
        } else {
            p.extend_from_slice(&[0, 6]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        p
    }

    /// Valid TCP checksum (and IPv4 header checksum) by the reference.
    fn assert_valid(pkt: &[u8]) {
        let v6 = pkt[0] >> 4 == 6;
        let ip_len = if v6 {
            40
        } else {
            assert_eq!(reference_checksum(&[&pkt[..20]]), 0, "IPv4 header checksum");
            assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
            20
        };
        if v6 {
            assert_eq!(
                usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) + 40,
                pkt.len()
            );
        }
        assert_eq!(
            reference_checksum(&[&pseudo(pkt, v6), &pkt[ip_len..]]),
            0,
            "TCP checksum"
        );
    }

    fn tcp_packet(v6: bool, seq: u32, flags: u8, payload: &[u8], opts: &[u8]) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 };
        let tcp_len = 20 + opts.len();
        let n = ip_len + tcp_len + payload.len();
        let mut p = vec![0u8; n];
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((n - 40) as u16).to_be_bytes());
            p[6] = PROTO_TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            p[6] = 0x40; // DF
            p[8] = 64;
            p[9] = PROTO_TCP;
            p[12..16].copy_from_slice(&[10, 234, 1, 1]);
            p[16..20].copy_from_slice(&[10, 234, 2, 1]);
            ipv4_header_checksum(&mut p[..20]);
        }
        let t = ip_len;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&777u32.to_be_bytes());
        p[t + 12] = ((tcp_len / 4) as u8) << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        p[t + 20..t + tcp_len].copy_from_slice(opts);
        p[t + tcp_len..].copy_from_slice(payload);
        tcp_checksum(&mut p, ip_len, v6);
        p
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    const TS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 5];

    #[test]
    fn checksum_matches_reference_for_odd_and_even_lengths() {
        for n in [0usize, 1, 2, 3, 5, 20, 1379, 1380, 9001] {
            let d = payload(n);
            for split in [0, (n / 2) & !1, n & !1] {
                let acc = sum(&d[split..], sum(&d[..split], 0));
                assert_eq!(
                    !fold(acc),
                    reference_checksum(&[&d]),
                    "len {n} split {split}"
                );
            }
        }
        // Carries across many 0xffff words.
        let d = vec![0xffu8; 70_001];
        assert_eq!(!fold(sum(&d, 0)), reference_checksum(&[&d]));
    }

    #[test]
    fn vnet_header_round_trips_little_endian() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1368,
            csum_start: 20,
            csum_offset: 16,
        };
        let b = h.encode();
        assert_eq!(b, [1, 1, 52, 0, 0x58, 5, 20, 0, 16, 0]);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    fn segment_all(hdr: &VnetHdr, pkt: &[u8]) -> Vec<Vec<u8>> {
        let mut scratch = vec![0u8; 65_536];
        let mut out = Vec::new();
        let n = tcp_segment(hdr, pkt, &mut scratch, |s| out.push(s.to_vec())).unwrap();
        assert_eq!(n, out.len());
        out
    }

    fn check_segmentation(v6: bool) {
        let data = payload(10_000);
        // What the kernel hands us: total length of the whole, partial csum.
        let sup = tcp_packet(v6, 1_000_000, TCP_ACK | TCP_PSH | TCP_CWR, &data, &TS);
        let ip_len = if v6 { 40 } else { 20 };
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (ip_len + 32) as u16,
            gso_size: 1368,
            csum_start: ip_len as u16,
            csum_offset: 16,
        };
        let segs = segment_all(&hdr, &sup);
        assert_eq!(segs.len(), 8); // 7 × 1368 + 424
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_valid(s);
            let t = ip_len;
            let seq = u32::from_be_bytes(s[t + 4..t + 8].try_into().unwrap());
            assert_eq!(seq, 1_000_000 + (i * 1368) as u32);
            let flags = s[t + 13];
            assert_eq!(flags & TCP_PSH != 0, i == 7, "PSH only on the last");
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
            assert_eq!(&s[t + 20..t + 32], &TS);
            if !v6 {
                assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
            }
            assert_eq!(s.len(), t + 32 + if i < 7 { 1368 } else { 424 });
            joined.extend_from_slice(&s[t + 32..]);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn segments_ipv4_tcp_super_packet() {
        check_segmentation(false);
    }

    #[test]
    fn segments_ipv6_tcp_super_packet() {
        check_segmentation(true);
    }

    #[test]
    fn segmentation_refuses_mismatched_family_and_zero_gso() {
        let p = tcp_packet(false, 1, TCP_ACK, &payload(3000), &[]);
        let mut hdr = VnetHdr {
            gso_type: GSO_TCPV6,
            gso_size: 1000,
            ..VnetHdr::default()
        };
        let mut s = vec![0u8; 4096];
        assert_eq!(
            tcp_segment(&hdr, &p, &mut s, |_| {}),
            Err(Malformed::NotTcp)
        );
        hdr.gso_type = GSO_TCPV4;
        hdr.gso_size = 0;
        assert_eq!(
            tcp_segment(&hdr, &p, &mut s, |_| {}),
            Err(Malformed::GsoSize)
        );
        let udp = {
            let mut u = p.clone();
            u[9] = 17;
            u
        };
        hdr.gso_size = 1000;
        assert_eq!(
            tcp_segment(&hdr, &udp, &mut s, |_| {}),
            Err(Malformed::NotTcp)
        );
    }

    #[test]
    fn finishes_partial_checksum() {
        let mut p = tcp_packet(false, 5, TCP_ACK, &payload(333), &[]);
        // Kernel style: field holds the pseudo-header sum.
        let ps = pseudo_sum(&p[12..16], &p[16..20], PROTO_TCP, p.len() - 20);
        p[36..38].copy_from_slice(&fold(ps).to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        finish_checksum(&hdr, &mut p).unwrap();
        assert_valid(&p);
        let bad = VnetHdr {
            csum_start: 400,
            ..hdr
        };
        assert_eq!(finish_checksum(&bad, &mut p), Err(Malformed::CsumOffsets));
    }

    /// Put packets one after another in a buffer, run GRO, collect what
    /// would be written (vnet header + packet bytes).
    fn gro(packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut at = Vec::new();
        for p in packets {
            at.push((buf.len(), p.len()));
            buf.extend_from_slice(p);
        }
        let mut g = Gro::default();
        for &(s, l) in &at {
            g.push(&buf, s, l);
        }
        let mut out = Vec::new();
        g.flush(&mut buf, |iov| {
            let h = VnetHdr::parse(&iov[0]).unwrap();
            out.push((h, iov[1..].iter().flat_map(|s| s.iter().copied()).collect()));
        });
        assert!(g.is_empty());
        out
    }

    /// Finish a coalesced packet as the kernel would (partial checksum),
    /// then split it back: it must equal the original segments' payload.
    fn check_coalesce(v6: bool) {
        let data = payload(1368 * 5 + 100);
        let mut segs = Vec::new();
        for (i, c) in data.chunks(1368).enumerate() {
            let flags = if i == 5 { TCP_ACK | TCP_PSH } else { TCP_ACK };
            segs.push(tcp_packet(v6, 42 + (i * 1368) as u32, flags, c, &TS));
        }
        let out = gro(&segs);
        assert_eq!(out.len(), 1, "one super-packet");
        let (h, mut p) = out.into_iter().next().unwrap();
        let ip_len = if v6 { 40 } else { 20 };
        assert_eq!(h.flags, F_NEEDS_CSUM);
        assert_eq!(h.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
        assert_eq!(usize::from(h.gso_size), 1368);
        assert_eq!(usize::from(h.hdr_len), ip_len + 32);
        assert_eq!(usize::from(h.csum_start), ip_len);
        assert_eq!(h.csum_offset, 16);
        assert_eq!(&p[ip_len + 32..], &data[..]);
        assert!(p[ip_len + 13] & TCP_PSH != 0);
        finish_checksum(&h, &mut p).unwrap();
        assert_valid(&p);
        // Segmenting it again gives back the very same packets (v4 ids
        // aside: all our test segments carry the same id).
        let again = segment_all(&h, &p);
        assert_eq!(again.len(), segs.len());
        for (a, b) in again.iter().zip(&segs) {
            assert_valid(a);
            assert_eq!(a[ip_len..], b[ip_len..]);
        }
    }

    #[test]
    fn coalesces_ipv4_tcp_segments() {
        check_coalesce(false);
    }

    #[test]
    fn coalesces_ipv6_tcp_segments() {
        check_coalesce(true);
    }

    #[test]
    fn gro_keeps_flows_apart_and_passes_others_through() {
        let a0 = tcp_packet(false, 100, TCP_ACK, &payload(500), &[]);
        let a1 = tcp_packet(false, 600, TCP_ACK, &payload(500), &[]);
        let mut b0 = tcp_packet(false, 100, TCP_ACK, &payload(500), &[]);
        b0[20..22].copy_from_slice(&40001u16.to_be_bytes()); // other source port
        tcp_checksum(&mut b0, 20, false);
        let icmp = {
            let mut p = vec![0u8; 84];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&84u16.to_be_bytes());
            p[9] = 1;
            p
        };
        let gap = tcp_packet(false, 5000, TCP_ACK, &payload(500), &[]); // not contiguous
        let syn = tcp_packet(false, 1100, TCP_SYN, &payload(10), &[]);
        let out = gro(&[
            a0.clone(),
            b0.clone(),
            icmp.clone(),
            a1,
            gap.clone(),
            syn.clone(),
        ]);
        assert_eq!(out.len(), 5);
        assert_eq!(out[0].0.gso_type, GSO_TCPV4);
        assert_eq!(out[0].1.len(), 40 + 1000);
        for (i, p) in [(1, &b0), (2, &icmp), (3, &gap), (4, &syn)] {
            assert_eq!(out[i].0, VnetHdr::default(), "item {i} plain");
            assert_eq!(&out[i].1, p, "item {i} untouched");
        }
    }

    #[test]
    fn gro_stops_after_short_segment_or_differing_ack_and_options() {
        let s0 = tcp_packet(false, 0, TCP_ACK, &payload(1000), &TS);
        let s1 = tcp_packet(false, 1000, TCP_ACK, &payload(400), &TS); // short: closes
        let s2 = tcp_packet(false, 1400, TCP_ACK, &payload(1000), &TS);
        let out = gro(&[s0, s1, s2]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.len(), 20 + 32 + 1400);
        let t0 = tcp_packet(false, 0, TCP_ACK, &payload(1000), &TS);
        let mut ts2 = TS;
        ts2[7] = 10;
        let t1 = tcp_packet(false, 1000, TCP_ACK, &payload(1000), &ts2);
        let mut t2 = tcp_packet(false, 1000, TCP_ACK, &payload(1000), &TS);
        t2[28..32].copy_from_slice(&778u32.to_be_bytes()); // other ack
        tcp_checksum(&mut t2, 20, false);
        assert_eq!(gro(&[t0.clone(), t1]).len(), 2, "options differ");
        assert_eq!(gro(&[t0, t2]).len(), 2, "ack differs");
    }

    #[test]
    fn gro_caps_the_super_packet_at_64k() {
        let segs: Vec<Vec<u8>> = (0..60)
            .map(|i| tcp_packet(false, (i * 1400) as u32, TCP_ACK, &payload(1400), &[]))
            .collect();
        let out = gro(&segs);
        assert!(out.len() >= 2);
        let mut total = 0;
        for (h, mut p) in out {
            assert!(p.len() <= MAX_SUPER);
            if h.gso_type != GSO_NONE {
                finish_checksum(&h, &mut p).unwrap();
            }
            assert_valid(&p);
            total += p.len() - 40;
        }
        assert_eq!(total, 60 * 1400);
    }
}
