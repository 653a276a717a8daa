// The frames that emulated NICs (verbs emulation, rdma/emu) exchange over Unix-domain
// stream sockets. Not ramkv's wire format: it never leaves one machine, and both ends
// are the same library, so fields are in host byte order (imm is carried as the
// application gave it, already in network order).
//
// Every frame is a fixed 48-byte header followed by `payload_bytes` bytes:
//
//    0                   1                   2                   3
//    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//   +---------------------------------------------------------------+
//   |                      magic ("RKVE")                           |  0
//   +---------------+---------------+---------------+---------------+
//   |    version    |     type      |     code      |    flags      |  4
//   +---------------+---------------+---------------+---------------+
//   |                      src_lid                                  |  8
//   |                      src_qpn                                  | 12
//   |                      dst_qpn                                  | 16
//   |                      psn (24 bits used)                       | 20
//   |                      imm (network order, opaque)              | 24
//   |                      rkey                                     | 28
//   |                      remote_addr (64 bits)                    | 32
//   |                                                               |
//   |                      length (RDMA READ: bytes asked for)      | 40
//   |                      payload_bytes                            | 44
//   +---------------------------------------------------------------+
//
// A sender dials the peer's socket and writes kHello first; connections are used in one
// direction only (the dialler writes, the acceptor reads), so each NIC sends to a peer
// over exactly one connection and RC ordering per queue pair follows from the stream.
// A frame that fails validation closes its connection (bytes from another process
// never reach an assertion).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ramkv::rdma::emu {

inline constexpr uint32_t kFrameMagic = 0x45564b52;  // "RKVE" little-endian
inline constexpr uint8_t kFrameVersion = 1;

enum class FrameType : uint8_t {
  kHello = 1,     // src_lid only
  kSend = 2,      // payload = message
  kSendImm = 3,   // payload = message, imm
  kWrite = 4,     // payload = data for [remote_addr, +payload_bytes) under rkey
  kWriteImm = 5,  // as kWrite, then consumes a receive with imm
  kReadReq = 6,   // asks for `length` bytes at remote_addr under rkey
  kAck = 7,       // responder: every request up to psn is done
  kReadResp = 8,  // responder: the data of the READ with this psn
  kNak = 9,       // responder: the request with this psn failed, code says why
};

// kNak codes (FrameHeader::code).
enum class NakCode : uint8_t {
  kRnr = 1,             // no receive posted; flags = the responder's min_rnr_timer
  kRemoteAccess = 2,    // bad rkey, out of bounds, or access not granted
  kInvalidRequest = 3,  // the message does not fit the receive buffer
  kRemoteOp = 4,        // the responder failed locally (bad lkey in its receive)
};

// FrameHeader::flags on requests.
inline constexpr uint8_t kFrameSolicited = 1;

struct FrameHeader {
  uint32_t magic;
  uint8_t version;
  uint8_t type;
  uint8_t code;
  uint8_t flags;
  uint32_t src_lid;
  uint32_t src_qpn;
  uint32_t dst_qpn;
  uint32_t psn;
  uint32_t imm;
  uint32_t rkey;
  uint64_t remote_addr;
  uint32_t length;
  uint32_t payload_bytes;
};
static_assert(sizeof(FrameHeader) == 48);
static_assert(offsetof(FrameHeader, remote_addr) == 32);

// The largest message (and so payload) the emulated device accepts: its max_msg_sz.
inline constexpr uint32_t kMaxMessageBytes = 1u << 30;

}  // namespace ramkv::rdma::emu
