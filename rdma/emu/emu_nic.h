// Nic: the emulated RDMA adapter of one process (verbs emulation, rdma/emu; the
// semantics and limits are in verbs_emu.cc's file comment and docs/rdma-emulation.md).
//
// One Nic exists per process while at least one ibv_context of the emulated device is
// open. It owns the process's LID (a lock file in the emulation directory), a listening
// Unix-domain socket named after the LID, the connections to peer NICs, and every
// verbs object (PD, MR, CQ, SRQ, QP) created through any of the process's contexts.
// Its thread plays the adapter: it transmits posted work requests, executes requests
// that arrive (places RDMA WRITE data, answers RDMA READs, consumes receives), and
// generates completions. The application's threads only post and poll.
//
// Threads and invariants:
//   1. mu_ guards all Nic state and every object's state except a Cq's entries, which
//      its own mutex guards (lock order: Nic::mu_, then Cq::mu). poll_cq takes only
//      the Cq's mutex.
//   2. Only the NIC thread touches sockets; posting threads queue work and write the
//      kick eventfd.
//   3. A QP's send queue completes in order: entry i completes before entry i+1.
//   4. A QP number, MR key or LID is never reused within one Nic's life.
//   5. The NIC thread blocks in epoll_wait (sockets, the kick eventfd, and the nearest
//      retry timer); it never spins.
#pragma once

#include <infiniband/verbs.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "rdma/emu/emu_wire.h"

namespace ramkv::rdma::emu {

using Clock = std::chrono::steady_clock;

inline constexpr const char* kDeviceName = "ramkv_verbs_emu0";
inline constexpr uint32_t kPsnMask = 0xffffff;

// Device limits reported by ibv_query_device and enforced at creation.
inline constexpr uint32_t kMaxQpWr = 16384;
inline constexpr uint32_t kMaxSge = 32;
inline constexpr uint32_t kMaxInlineData = 1024;
inline constexpr uint32_t kMaxCqe = 1 << 20;
inline constexpr uint32_t kMaxRdAtomic = 16;

// Prints "verbs emulation: <message>" on stderr (one write), unless RAMKV_LOG_LEVEL asks
// for warnings or less and `warning` is false.
void emu_log(bool warning, const char* format, ...) __attribute__((format(printf, 2, 3)));

struct Nic;

struct Pd {
  ibv_pd ibv;
  Nic* nic;
  int use_count = 0;  // MRs, QPs and SRQs that use it
};

struct Mr {
  ibv_mr ibv;
  Nic* nic;
  uint64_t iova;  // the address remote and local requests name (== addr unless _iova)
  unsigned access;
};

// One completion as a CQ holds it. `sq_retired`, for send completions, lets poll_cq
// free the send-queue slots of this work request and every unsignalled one before it
// (as hardware frees them when the completion is consumed).
struct Cqe {
  ibv_wc wc;
  std::shared_ptr<std::atomic<uint64_t>> sq_retired;
  uint64_t sq_seq = 0;
};

struct Channel {
  ibv_comp_channel ibv;  // ibv.fd: the read end of a pipe of 8-byte CQ ids
  int write_fd = -1;
  int cq_count = 0;  // guarded by the Nic's mu_
};

struct Cq {
  ibv_cq ibv;
  Nic* nic;
  uint64_t id;        // what events in the channel's pipe name
  uint32_t capacity;  // ibv.cqe
  int use_count = 0;  // QPs that use it (guarded by Nic::mu_)
  std::mutex mu;
  std::condition_variable acked_cv;
  std::deque<Cqe> entries;  // at most `capacity`
  bool armed = false;
  bool solicited_only = false;
  bool overrun_logged = false;
  uint32_t events_delivered = 0;  // by ibv_get_cq_event
  uint32_t events_acked = 0;
};

struct RecvWqe {
  uint64_t wr_id;
  std::vector<ibv_sge> sges;
};

struct Srq {
  ibv_srq ibv;
  Nic* nic;
  Pd* pd;
  uint32_t max_wr;
  uint32_t max_sge;
  std::deque<RecvWqe> wqes;
  int use_count = 0;  // QPs attached
};

struct SendWqe {
  uint64_t wr_id = 0;
  ibv_wr_opcode opcode = IBV_WR_SEND;
  bool signaled = false;
  bool solicited = false;
  bool is_inline = false;
  std::vector<ibv_sge> sges;         // not inline
  std::vector<uint8_t> inline_data;  // inline: copied at post time
  uint32_t imm = 0;
  uint64_t remote_addr = 0;
  uint32_t rkey = 0;
  uint32_t length = 0;  // total bytes of the message
  uint32_t psn = 0;
  uint64_t seq = 0;  // 1-based position in the send queue's history
  // A local error found at post time or when gathering: the request is not sent, and
  // completes with this status once every earlier request has.
  ibv_wc_status local_error = IBV_WC_SUCCESS;
};

struct Qp {
  ibv_qp ibv;
  Nic* nic;
  Pd* pd;
  Cq* send_cq;
  Cq* recv_cq;
  Srq* srq;
  ibv_qp_cap cap;
  bool sq_sig_all;
  ibv_qp_attr attr{};  // what modify_qp set (ibv.state is the current state)

  // Requester. sq holds posted requests not yet completed; [0, next_tx) were sent.
  std::deque<SendWqe> sq;
  size_t next_tx = 0;
  uint32_t next_psn = 0;
  uint64_t sq_next_seq = 1;
  std::shared_ptr<std::atomic<uint64_t>> sq_retired = std::make_shared<std::atomic<uint64_t>>(0);
  int retries_left = 0;
  int rnr_retries_left = 0;
  std::optional<Clock::time_point> ack_deadline;  // retransmit when it passes
  std::optional<Clock::time_point> rnr_deadline;  // resend after an RNR NAK

  // Responder.
  uint32_t expected_psn = 0;
  std::deque<RecvWqe> rq;  // unused with an SRQ
};

// The Nic of this process, started by the first ibv_open_device and stopped by the last
// ibv_close_device.
struct Nic {
  // The process's Nic for a new context: started (thread, LID, socket) by the first
  // call; nullptr (and errno) when the directory or the socket cannot be set up, the
  // reason logged. Each successful acquire() is paired with one release(); the last
  // release stops the thread, closes the sockets and frees the LID.
  static Nic* acquire();
  static void release(Nic* nic);

  // Posting side (application threads; take mu_).
  int post_send(Qp* qp, ibv_send_wr* wr, ibv_send_wr** bad_wr);
  int post_recv(Qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad_wr);
  int post_srq_recv(Srq* srq, ibv_recv_wr* wr, ibv_recv_wr** bad_wr);
  int modify_qp(Qp* qp, const ibv_qp_attr& attr, int mask);

  // Completion helpers (mu_ held).
  void push_cqe(Cq* cq, const Cqe& cqe, bool solicited);
  void complete_send(Qp* qp, const SendWqe& wqe, ibv_wc_status status);
  void complete_recv(Qp* qp, const RecvWqe& wqe, ibv_wc_status status, ibv_wc_opcode opcode,
                     uint32_t byte_len, uint32_t imm, bool with_imm, const FrameHeader* from);
  // Moves the QP to ERR and flushes its send queue and own receive queue.
  void to_error(Qp* qp);
  void kick();

  // Memory checks (mu_ held). A null result means the access is not allowed.
  Mr* find_mr(uint32_t key);
  uint8_t* local_range(Pd* pd, const ibv_sge& sge, bool need_write);
  uint8_t* remote_range(Qp* qp, uint32_t rkey, uint64_t addr, uint64_t length, unsigned access);

  uint16_t lid() const { return lid_; }

  std::mutex mu_;
  std::unordered_map<uint32_t, Qp*> qps_;
  std::unordered_map<uint32_t, Mr*> mrs_;
  uint32_t next_qpn_ = 0;
  uint32_t next_key_ = 0;
  uint32_t next_handle_ = 1;

 private:
  struct Conn {
    uint64_t id = 0;
    int fd = -1;
    uint16_t peer_lid = 0;  // dialled connections: the peer we send to
    bool dialled = false;
    bool want_out = false;  // EPOLLOUT registered
    std::vector<uint8_t> in;
    size_t in_bytes = 0;
    std::deque<std::vector<uint8_t>> out;
    size_t out_offset = 0;  // into out.front()
  };

  static Nic* start();
  void stop();
  void run();
  void handle_conn_event(uint64_t id, uint32_t events);
  bool read_conn(Conn& conn);  // false: close it
  bool parse_frames(Conn& conn);
  bool handle_frame(const FrameHeader& header, const uint8_t* payload);
  bool flush_conn(Conn& conn);
  void close_conn(uint64_t id);
  void accept_all();
  int dial(uint16_t lid);
  void send_frame(uint16_t lid, std::vector<uint8_t> frame);
  std::optional<Clock::time_point> next_deadline();
  void fire_timers();

  // Requester (emu_qp.cc).
  void pump(Qp* qp);
  bool transmit(Qp* qp, SendWqe& wqe);
  void retire_head_errors(Qp* qp);
  void fail_head(Qp* qp, ibv_wc_status status);
  void on_ack(Qp* qp, uint32_t psn);
  void on_read_resp(Qp* qp, const FrameHeader& h, const uint8_t* payload);
  void on_nak(Qp* qp, const FrameHeader& h);
  void go_back(Qp* qp);

  // Responder (emu_responder.cc).
  void on_request(const FrameHeader& h, const uint8_t* payload);
  void execute_request(Qp* qp, const FrameHeader& h, const uint8_t* payload);
  RecvWqe* front_recv(Qp* qp);  // the receive the next message consumes, or null
  void pop_recv(Qp* qp);
  void respond(Qp* qp, const FrameHeader& request, FrameType type, NakCode code,
               const uint8_t* data, uint32_t data_bytes);
  // A frame from `qp` to its peer QP, with room for `data_bytes` after the header.
  std::vector<uint8_t> make_frame(FrameType type, Qp* qp, uint32_t psn, uint32_t data_bytes);

  uint16_t lid_ = 0;
  std::string dir_;
  std::string sock_path_;
  int lock_fd_ = -1;
  int listen_fd_ = -1;
  int epoll_fd_ = -1;
  int kick_fd_ = -1;
  std::thread thread_;
  bool stopping_ = false;  // mu_
  bool running_ = false;   // mu_: the thread has started (start() waits for it)
  std::condition_variable running_cv_;
  uint64_t next_conn_id_ = 16;
  std::unordered_map<uint64_t, Conn> conns_;
  std::unordered_map<uint16_t, uint64_t> dialled_;  // peer lid -> conn id
  std::set<uint32_t> dirty_;                        // QPs with requests to transmit
  int context_count_ = 0;                           // guarded by the open lock in emu_nic.cc
  friend void emu_atfork_child();
};

void emu_atfork_child();

// How ibv_* pointers map back to the objects (each object starts with its ibv_ struct).
template <typename T, typename I>
T* from_ibv(I* p) {
  static_assert(std::is_standard_layout_v<T>);
  return reinterpret_cast<T*>(p);
}

// 24-bit PSN arithmetic: whether a comes at or before b in the window.
inline bool psn_le(uint32_t a, uint32_t b) { return ((b - a) & kPsnMask) < 0x800000; }

}  // namespace ramkv::rdma::emu
