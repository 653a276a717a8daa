// Queue pairs of the emulated adapter (verbs emulation; see emu_nic.h): posting, the RC
// state machine, completions, and the requester's side of the reliable protocol
// (transmission, acknowledgements, NAKs, retransmission). The responder's side is in
// emu_responder.cc.
//
// The requester keeps posted requests in Qp::sq in order; [0, next_tx) have been sent
// and await their acknowledgement. An ACK for psn p completes every sent request up to
// p; a READ completes with its response. While anything sent is unacknowledged, the ack
// timer runs: when it expires the requester goes back to the oldest unacknowledged
// request and sends everything again (go-back-N), retry_cnt times, then fails the
// request with IBV_WC_RETRY_EXC_ERR. An RNR NAK stops transmission for the responder's
// RNR delay, then goes back the same way. The responder executes requests strictly in
// PSN order, drops those ahead of the expected PSN, and acknowledges duplicates
// without executing them again (it answers a duplicate READ again).
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "rdma/emu/emu_nic.h"

namespace ramkv::rdma::emu {
namespace {

// The local ACK timeout, 4.096 us * 2^timeout, clamped so that a dead peer is noticed
// in bounded time and a tiny value does not retransmit in a storm (docs).
Clock::duration ack_timeout(uint8_t timeout) {
  constexpr int64_t kMinUs = 20'000;
  constexpr int64_t kMaxUs = 500'000;
  if (timeout == 0) return std::chrono::microseconds(kMaxUs);  // "infinite"
  const int64_t us = (int64_t{4096} << std::min<int>(timeout, 31)) / 1000;
  return std::chrono::microseconds(std::clamp(us, kMinUs, kMaxUs));
}

// IB's encoding of the minimum RNR NAK timer, in microseconds (code 0 is 655.36 ms).
Clock::duration rnr_delay(uint8_t code) {
  static constexpr uint32_t kUs[32] = {
      655360, 10,    20,    30,    40,    60,     80,     120,    160,    240,   320,
      480,    640,   960,   1280,  1920,  2560,   3840,   5120,   7680,   10240, 15360,
      20480,  30720, 40960, 61440, 81920, 122880, 163840, 245760, 327680, 491520};
  return std::chrono::microseconds(kUs[code & 31]);
}

ibv_wc_opcode wc_opcode(ibv_wr_opcode opcode) {
  switch (opcode) {
    case IBV_WR_RDMA_WRITE:
    case IBV_WR_RDMA_WRITE_WITH_IMM:
      return IBV_WC_RDMA_WRITE;
    case IBV_WR_RDMA_READ:
      return IBV_WC_RDMA_READ;
    default:
      return IBV_WC_SEND;
  }
}

FrameType frame_type(ibv_wr_opcode opcode) {
  switch (opcode) {
    case IBV_WR_RDMA_WRITE:
      return FrameType::kWrite;
    case IBV_WR_RDMA_WRITE_WITH_IMM:
      return FrameType::kWriteImm;
    case IBV_WR_SEND_WITH_IMM:
      return FrameType::kSendImm;
    case IBV_WR_RDMA_READ:
      return FrameType::kReadReq;
    default:
      return FrameType::kSend;
  }
}

bool supported_opcode(ibv_wr_opcode opcode) {
  return opcode == IBV_WR_SEND || opcode == IBV_WR_SEND_WITH_IMM || opcode == IBV_WR_RDMA_WRITE ||
         opcode == IBV_WR_RDMA_WRITE_WITH_IMM || opcode == IBV_WR_RDMA_READ;
}

constexpr unsigned kQpAccessFlags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
                                    IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;

// The attribute masks an RC transition requires and allows (as the kernel's
// ib_modify_qp_is_ok). False: the transition itself is invalid.
bool transition_masks(ibv_qp_state from, ibv_qp_state to, int* required, int* optional) {
  *required = 0;
  *optional = 0;
  if (to == IBV_QPS_RESET || to == IBV_QPS_ERR) return from != IBV_QPS_UNKNOWN;
  switch (from) {
    case IBV_QPS_RESET:
      if (to != IBV_QPS_INIT) return false;
      *required = IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
      return true;
    case IBV_QPS_INIT:
      if (to == IBV_QPS_INIT) {
        *optional = IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
        return true;
      }
      if (to != IBV_QPS_RTR) return false;
      *required = IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                  IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
      *optional = IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX;
      return true;
    case IBV_QPS_RTR:
      if (to != IBV_QPS_RTS) return false;
      *required = IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                  IBV_QP_MAX_QP_RD_ATOMIC;
      *optional = IBV_QP_CUR_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER | IBV_QP_ALT_PATH |
                  IBV_QP_PATH_MIG_STATE;
      return true;
    case IBV_QPS_RTS:
      if (to != IBV_QPS_RTS) return false;
      *optional = IBV_QP_CUR_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER | IBV_QP_ALT_PATH |
                  IBV_QP_PATH_MIG_STATE;
      return true;
    default:
      return false;  // SQD and SQE are not emulated; ERR leaves only to RESET
  }
}

bool valid_values(const ibv_qp_attr& a, int mask) {
  if ((mask & IBV_QP_PORT) && a.port_num != 1) return false;
  if ((mask & IBV_QP_PKEY_INDEX) && a.pkey_index != 0) return false;
  if ((mask & IBV_QP_ACCESS_FLAGS) && (a.qp_access_flags & ~kQpAccessFlags) != 0) return false;
  if ((mask & IBV_QP_PATH_MTU) && (a.path_mtu < IBV_MTU_256 || a.path_mtu > IBV_MTU_4096)) {
    return false;
  }
  if ((mask & IBV_QP_AV) && (a.ah_attr.dlid == 0 || a.ah_attr.port_num != 1)) return false;
  if ((mask & IBV_QP_DEST_QPN) && a.dest_qp_num > kPsnMask) return false;
  if ((mask & IBV_QP_MAX_DEST_RD_ATOMIC) && a.max_dest_rd_atomic > kMaxRdAtomic) return false;
  if ((mask & IBV_QP_MAX_QP_RD_ATOMIC) && a.max_rd_atomic > kMaxRdAtomic) return false;
  if ((mask & IBV_QP_MIN_RNR_TIMER) && a.min_rnr_timer > 31) return false;
  if ((mask & IBV_QP_TIMEOUT) && a.timeout > 31) return false;
  if ((mask & IBV_QP_RETRY_CNT) && a.retry_cnt > 7) return false;
  if ((mask & IBV_QP_RNR_RETRY) && a.rnr_retry > 7) return false;
  return true;
}

void apply_attrs(ibv_qp_attr* to, const ibv_qp_attr& a, int mask) {
  if (mask & IBV_QP_PKEY_INDEX) to->pkey_index = a.pkey_index;
  if (mask & IBV_QP_PORT) to->port_num = a.port_num;
  if (mask & IBV_QP_ACCESS_FLAGS) to->qp_access_flags = a.qp_access_flags;
  if (mask & IBV_QP_AV) to->ah_attr = a.ah_attr;
  if (mask & IBV_QP_ALT_PATH) to->alt_ah_attr = a.alt_ah_attr;
  if (mask & IBV_QP_PATH_MTU) to->path_mtu = a.path_mtu;
  if (mask & IBV_QP_DEST_QPN) to->dest_qp_num = a.dest_qp_num;
  if (mask & IBV_QP_RQ_PSN) to->rq_psn = a.rq_psn & kPsnMask;
  if (mask & IBV_QP_SQ_PSN) to->sq_psn = a.sq_psn & kPsnMask;
  if (mask & IBV_QP_MAX_DEST_RD_ATOMIC) to->max_dest_rd_atomic = a.max_dest_rd_atomic;
  if (mask & IBV_QP_MAX_QP_RD_ATOMIC) to->max_rd_atomic = a.max_rd_atomic;
  if (mask & IBV_QP_MIN_RNR_TIMER) to->min_rnr_timer = a.min_rnr_timer;
  if (mask & IBV_QP_TIMEOUT) to->timeout = a.timeout;
  if (mask & IBV_QP_RETRY_CNT) to->retry_cnt = a.retry_cnt;
  if (mask & IBV_QP_RNR_RETRY) to->rnr_retry = a.rnr_retry;
  if (mask & IBV_QP_PATH_MIG_STATE) to->path_mig_state = a.path_mig_state;
}

}  // namespace

// ---- Memory checks -------------------------------------------------------------------

Mr* Nic::find_mr(uint32_t key) {
  auto it = mrs_.find(key);
  return it == mrs_.end() ? nullptr : it->second;
}

namespace {
uint8_t* mr_range(Mr* mr, uint64_t addr, uint64_t length) {
  if (addr < mr->iova || length > mr->ibv.length || addr - mr->iova > mr->ibv.length - length) {
    return nullptr;
  }
  return static_cast<uint8_t*>(mr->ibv.addr) + (addr - mr->iova);
}
}  // namespace

uint8_t* Nic::local_range(Pd* pd, const ibv_sge& sge, bool need_write) {
  Mr* mr = find_mr(sge.lkey);
  if (mr == nullptr || mr->ibv.pd != &pd->ibv) return nullptr;
  if (need_write && (mr->access & IBV_ACCESS_LOCAL_WRITE) == 0) return nullptr;
  return mr_range(mr, sge.addr, sge.length);
}

uint8_t* Nic::remote_range(Qp* qp, uint32_t rkey, uint64_t addr, uint64_t length, unsigned access) {
  Mr* mr = find_mr(rkey);
  if (mr == nullptr || mr->ibv.pd != &qp->pd->ibv) return nullptr;
  if ((mr->access & access) == 0 || (qp->attr.qp_access_flags & access) == 0) return nullptr;
  return mr_range(mr, addr, length);
}

// ---- Completions ---------------------------------------------------------------------

void Nic::push_cqe(Cq* cq, const Cqe& cqe, bool solicited) {
  std::lock_guard<std::mutex> lock(cq->mu);
  if (cq->entries.size() >= cq->capacity) {
    if (!cq->overrun_logged) {
      emu_log(true, "CQ overrun (%u entries): completions are being dropped", cq->capacity);
      cq->overrun_logged = true;
    }
    return;
  }
  cq->entries.push_back(cqe);
  const bool wanted = !cq->solicited_only || solicited || cqe.wc.status != IBV_WC_SUCCESS;
  if (cq->armed && wanted) {
    cq->armed = false;
    if (cq->ibv.channel != nullptr) {
      const int fd = from_ibv<Channel>(cq->ibv.channel)->write_fd;
      ssize_t ignored = ::write(fd, &cq->id, sizeof(cq->id));
      (void)ignored;
    }
  }
}

void Nic::complete_send(Qp* qp, const SendWqe& wqe, ibv_wc_status status) {
  // Unsignalled requests complete silently unless they fail (rxe does the same).
  if (status == IBV_WC_SUCCESS && !wqe.signaled) return;
  Cqe cqe;
  cqe.wc = ibv_wc{};
  cqe.wc.wr_id = wqe.wr_id;
  cqe.wc.status = status;
  cqe.wc.opcode = wc_opcode(wqe.opcode);
  cqe.wc.byte_len = wqe.length;
  cqe.wc.qp_num = qp->ibv.qp_num;
  cqe.sq_retired = qp->sq_retired;
  cqe.sq_seq = wqe.seq;
  push_cqe(qp->send_cq, cqe, false);
}

void Nic::complete_recv(Qp* qp, const RecvWqe& wqe, ibv_wc_status status, ibv_wc_opcode opcode,
                        uint32_t byte_len, uint32_t imm, bool with_imm, const FrameHeader* from) {
  Cqe cqe;
  cqe.wc = ibv_wc{};
  cqe.wc.wr_id = wqe.wr_id;
  cqe.wc.status = status;
  cqe.wc.opcode = opcode;
  cqe.wc.byte_len = byte_len;
  cqe.wc.qp_num = qp->ibv.qp_num;
  if (with_imm) {
    cqe.wc.imm_data = imm;
    cqe.wc.wc_flags = IBV_WC_WITH_IMM;
  }
  if (from != nullptr) {
    cqe.wc.src_qp = from->src_qpn;
    cqe.wc.slid = static_cast<uint16_t>(from->src_lid);
  }
  const bool solicited = from != nullptr && (from->flags & kFrameSolicited) != 0;
  push_cqe(qp->recv_cq, cqe, solicited);
}

void Nic::to_error(Qp* qp) {
  qp->ibv.state = IBV_QPS_ERR;
  qp->ack_deadline.reset();
  qp->rnr_deadline.reset();
  for (const SendWqe& wqe : qp->sq) complete_send(qp, wqe, IBV_WC_WR_FLUSH_ERR);
  qp->sq.clear();
  qp->next_tx = 0;
  // Receives of an SRQ belong to the SRQ and stay posted.
  for (const RecvWqe& wqe : qp->rq) {
    complete_recv(qp, wqe, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, 0, 0, false, nullptr);
  }
  qp->rq.clear();
}

// ---- Posting -------------------------------------------------------------------------

int Nic::post_send(Qp* qp, ibv_send_wr* wr, ibv_send_wr** bad_wr) {
  int err = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (; wr != nullptr; wr = wr->next) {
      const ibv_qp_state state = qp->ibv.state;
      const bool is_inline = (wr->send_flags & IBV_SEND_INLINE) != 0;
      const uint64_t outstanding =
          qp->sq_next_seq - 1 - qp->sq_retired->load(std::memory_order_acquire);
      if (state != IBV_QPS_RTS && state != IBV_QPS_ERR) {
        err = EINVAL;
      } else if (!supported_opcode(wr->opcode) || wr->num_sge < 0 ||
                 static_cast<uint32_t>(wr->num_sge) > qp->cap.max_send_sge ||
                 (is_inline && wr->opcode == IBV_WR_RDMA_READ)) {
        err = EINVAL;
      } else if (outstanding >= qp->cap.max_send_wr) {
        err = ENOMEM;
      }
      uint64_t total = 0;
      for (int i = 0; err == 0 && i < wr->num_sge; ++i) total += wr->sg_list[i].length;
      if (err == 0 && is_inline && total > qp->cap.max_inline_data) err = EINVAL;
      if (err != 0) {
        *bad_wr = wr;
        break;
      }
      SendWqe wqe;
      wqe.wr_id = wr->wr_id;
      wqe.opcode = wr->opcode;
      wqe.signaled = qp->sq_sig_all || (wr->send_flags & IBV_SEND_SIGNALED) != 0;
      wqe.solicited = (wr->send_flags & IBV_SEND_SOLICITED) != 0;
      wqe.is_inline = is_inline;
      wqe.imm = wr->imm_data;
      wqe.remote_addr = wr->wr.rdma.remote_addr;
      wqe.rkey = wr->wr.rdma.rkey;
      wqe.length = static_cast<uint32_t>(std::min<uint64_t>(total, UINT32_MAX));
      wqe.seq = qp->sq_next_seq++;
      if (total > kMaxMessageBytes) wqe.local_error = IBV_WC_LOC_LEN_ERR;
      if (is_inline) {
        // The caller may reuse its buffers as soon as this returns.
        wqe.inline_data.resize(total);
        size_t offset = 0;
        for (int i = 0; i < wr->num_sge; ++i) {
          const ibv_sge& sge = wr->sg_list[i];
          std::memcpy(wqe.inline_data.data() + offset, reinterpret_cast<void*>(sge.addr),
                      sge.length);
          offset += sge.length;
        }
      } else {
        wqe.sges.assign(wr->sg_list, wr->sg_list + wr->num_sge);
        const bool to_local = wr->opcode == IBV_WR_RDMA_READ;
        for (const ibv_sge& sge : wqe.sges) {
          if (sge.length > 0 && local_range(qp->pd, sge, to_local) == nullptr) {
            wqe.local_error = IBV_WC_LOC_PROT_ERR;
          }
        }
      }
      if (state == IBV_QPS_ERR) {
        complete_send(qp, wqe, IBV_WC_WR_FLUSH_ERR);
        continue;
      }
      wqe.psn = qp->next_psn;
      qp->next_psn = (qp->next_psn + 1) & kPsnMask;
      qp->sq.push_back(std::move(wqe));
    }
    dirty_.insert(qp->ibv.qp_num);
  }
  kick();
  return err;
}

int Nic::post_recv(Qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad_wr) {
  std::lock_guard<std::mutex> lock(mu_);
  for (; wr != nullptr; wr = wr->next) {
    int err = 0;
    if (qp->srq != nullptr || qp->ibv.state == IBV_QPS_RESET || wr->num_sge < 0 ||
        static_cast<uint32_t>(wr->num_sge) > qp->cap.max_recv_sge) {
      err = EINVAL;
    } else if (qp->rq.size() >= qp->cap.max_recv_wr) {
      err = ENOMEM;
    }
    if (err != 0) {
      *bad_wr = wr;
      return err;
    }
    RecvWqe wqe{wr->wr_id, std::vector<ibv_sge>(wr->sg_list, wr->sg_list + wr->num_sge)};
    if (qp->ibv.state == IBV_QPS_ERR) {
      complete_recv(qp, wqe, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, 0, 0, false, nullptr);
    } else {
      qp->rq.push_back(std::move(wqe));
    }
  }
  return 0;
}

int Nic::post_srq_recv(Srq* srq, ibv_recv_wr* wr, ibv_recv_wr** bad_wr) {
  std::lock_guard<std::mutex> lock(mu_);
  for (; wr != nullptr; wr = wr->next) {
    int err = 0;
    if (wr->num_sge < 0 || static_cast<uint32_t>(wr->num_sge) > srq->max_sge) {
      err = EINVAL;
    } else if (srq->wqes.size() >= srq->max_wr) {
      err = ENOMEM;
    }
    if (err != 0) {
      *bad_wr = wr;
      return err;
    }
    srq->wqes.push_back({wr->wr_id, std::vector<ibv_sge>(wr->sg_list, wr->sg_list + wr->num_sge)});
  }
  return 0;
}

// ---- The state machine ---------------------------------------------------------------

int Nic::modify_qp(Qp* qp, const ibv_qp_attr& attr, int mask) {
  std::lock_guard<std::mutex> lock(mu_);
  const ibv_qp_state from = qp->ibv.state;
  const ibv_qp_state to = (mask & IBV_QP_STATE) ? attr.qp_state : from;
  int required = 0;
  int optional = 0;
  const bool valid = transition_masks(from, to, &required, &optional);
  if (!valid || (mask & required) != required ||
      (mask & ~(required | optional | IBV_QP_STATE)) != 0 ||
      ((mask & IBV_QP_CUR_STATE) && attr.cur_qp_state != from) || !valid_values(attr, mask)) {
    errno = EINVAL;
    return EINVAL;
  }
  if (to == IBV_QPS_RESET) {
    // Everything outstanding is discarded without completions.
    qp->sq.clear();
    qp->rq.clear();
    qp->next_tx = 0;
    qp->ack_deadline.reset();
    qp->rnr_deadline.reset();
    qp->sq_retired->store(qp->sq_next_seq - 1);
    qp->attr = ibv_qp_attr{};
    qp->ibv.state = IBV_QPS_RESET;
    return 0;
  }
  apply_attrs(&qp->attr, attr, mask);
  if (to == IBV_QPS_ERR) {
    to_error(qp);
    return 0;
  }
  if (from == IBV_QPS_INIT && to == IBV_QPS_RTR) qp->expected_psn = qp->attr.rq_psn;
  if (from == IBV_QPS_RTR && to == IBV_QPS_RTS) {
    qp->next_psn = qp->attr.sq_psn;
    qp->retries_left = qp->attr.retry_cnt;
    qp->rnr_retries_left = qp->attr.rnr_retry;
  }
  qp->ibv.state = to;
  return 0;
}

// ---- Requester -----------------------------------------------------------------------

std::vector<uint8_t> Nic::make_frame(FrameType type, Qp* qp, uint32_t psn, uint32_t data_bytes) {
  std::vector<uint8_t> frame(sizeof(FrameHeader) + data_bytes);
  FrameHeader h{};
  h.magic = kFrameMagic;
  h.version = kFrameVersion;
  h.type = static_cast<uint8_t>(type);
  h.src_lid = lid_;
  h.src_qpn = qp->ibv.qp_num;
  h.dst_qpn = qp->attr.dest_qp_num;
  h.psn = psn;
  h.payload_bytes = data_bytes;
  std::memcpy(frame.data(), &h, sizeof(h));
  return frame;
}

bool Nic::transmit(Qp* qp, SendWqe& wqe) {
  const bool is_read = wqe.opcode == IBV_WR_RDMA_READ;
  if (is_read) {
    // The destination must still be writable when the response comes; checked now too.
    for (const ibv_sge& sge : wqe.sges) {
      if (sge.length > 0 && local_range(qp->pd, sge, true) == nullptr) {
        wqe.local_error = IBV_WC_LOC_PROT_ERR;
        return false;
      }
    }
  }
  std::vector<uint8_t> frame =
      make_frame(frame_type(wqe.opcode), qp, wqe.psn, is_read ? 0 : wqe.length);
  FrameHeader h;
  std::memcpy(&h, frame.data(), sizeof(h));
  h.imm = wqe.imm;
  h.rkey = wqe.rkey;
  h.remote_addr = wqe.remote_addr;
  h.length = wqe.length;
  h.flags = wqe.solicited ? kFrameSolicited : 0;
  std::memcpy(frame.data(), &h, sizeof(h));
  if (!is_read) {
    uint8_t* out = frame.data() + sizeof(FrameHeader);
    if (wqe.is_inline) {
      std::memcpy(out, wqe.inline_data.data(), wqe.inline_data.size());
    } else {
      // Gathered now, as an adapter reads host memory when it processes the request:
      // the application must not change it before the completion.
      for (const ibv_sge& sge : wqe.sges) {
        if (sge.length == 0) continue;
        const uint8_t* in = local_range(qp->pd, sge, false);
        if (in == nullptr) {
          wqe.local_error = IBV_WC_LOC_PROT_ERR;
          return false;
        }
        std::memcpy(out, in, sge.length);
        out += sge.length;
      }
    }
  }
  send_frame(static_cast<uint16_t>(qp->attr.ah_attr.dlid), std::move(frame));
  return true;
}

void Nic::pump(Qp* qp) {
  if (qp->ibv.state != IBV_QPS_RTS || qp->rnr_deadline) return;
  retire_head_errors(qp);
  while (qp->ibv.state == IBV_QPS_RTS && qp->next_tx < qp->sq.size()) {
    SendWqe& wqe = qp->sq[qp->next_tx];
    if (wqe.local_error != IBV_WC_SUCCESS || !transmit(qp, wqe)) break;
    qp->next_tx++;
    if (!qp->ack_deadline) qp->ack_deadline = Clock::now() + ack_timeout(qp->attr.timeout);
  }
  retire_head_errors(qp);
}

void Nic::retire_head_errors(Qp* qp) {
  // A request that failed locally completes once everything before it has.
  if (qp->ibv.state == IBV_QPS_RTS && qp->next_tx == 0 && !qp->sq.empty() &&
      qp->sq.front().local_error != IBV_WC_SUCCESS) {
    fail_head(qp, qp->sq.front().local_error);
  }
}

void Nic::fail_head(Qp* qp, ibv_wc_status status) {
  if (!qp->sq.empty()) {
    complete_send(qp, qp->sq.front(), status);
    qp->sq.pop_front();
  }
  to_error(qp);
}

void Nic::go_back(Qp* qp) {
  qp->next_tx = 0;
  pump(qp);
}

void Nic::on_ack(Qp* qp, uint32_t psn) {
  bool progress = false;
  while (qp->next_tx > 0 && psn_le(qp->sq.front().psn, psn) &&
         qp->sq.front().opcode != IBV_WR_RDMA_READ) {
    complete_send(qp, qp->sq.front(), IBV_WC_SUCCESS);
    qp->sq.pop_front();
    qp->next_tx--;
    progress = true;
  }
  if (!progress) return;
  qp->retries_left = qp->attr.retry_cnt;
  qp->rnr_retries_left = qp->attr.rnr_retry;
  if (qp->next_tx > 0) {
    qp->ack_deadline = Clock::now() + ack_timeout(qp->attr.timeout);
  } else {
    qp->ack_deadline.reset();
  }
  retire_head_errors(qp);
}

void Nic::on_read_resp(Qp* qp, const FrameHeader& h, const uint8_t* payload) {
  on_ack(qp, (h.psn - 1) & kPsnMask);  // a response acknowledges what came before
  if (qp->ibv.state != IBV_QPS_RTS || qp->next_tx == 0) return;
  SendWqe& wqe = qp->sq.front();
  if (wqe.psn != h.psn || wqe.opcode != IBV_WR_RDMA_READ) return;  // a stale duplicate
  if (h.payload_bytes != wqe.length) {
    fail_head(qp, IBV_WC_BAD_RESP_ERR);
    return;
  }
  const uint8_t* in = payload;
  for (const ibv_sge& sge : wqe.sges) {
    if (sge.length == 0) continue;
    uint8_t* out = local_range(qp->pd, sge, true);
    if (out == nullptr) {
      fail_head(qp, IBV_WC_LOC_PROT_ERR);
      return;
    }
    std::memcpy(out, in, sge.length);
    in += sge.length;
  }
  complete_send(qp, wqe, IBV_WC_SUCCESS);
  qp->sq.pop_front();
  qp->next_tx--;
  qp->retries_left = qp->attr.retry_cnt;
  qp->rnr_retries_left = qp->attr.rnr_retry;
  if (qp->next_tx > 0) {
    qp->ack_deadline = Clock::now() + ack_timeout(qp->attr.timeout);
  } else {
    qp->ack_deadline.reset();
  }
  retire_head_errors(qp);
}

void Nic::on_nak(Qp* qp, const FrameHeader& h) {
  on_ack(qp, (h.psn - 1) & kPsnMask);
  if (qp->ibv.state != IBV_QPS_RTS || qp->next_tx == 0 || qp->sq.front().psn != h.psn) return;
  switch (static_cast<NakCode>(h.code)) {
    case NakCode::kRnr:
      if (qp->attr.rnr_retry != 7) {  // 7 means retry for ever
        if (qp->rnr_retries_left == 0) {
          fail_head(qp, IBV_WC_RNR_RETRY_EXC_ERR);
          return;
        }
        qp->rnr_retries_left--;
      }
      // Requests sent after this one are dropped by the responder; all are sent again
      // once the responder's RNR delay has passed.
      qp->ack_deadline.reset();
      qp->next_tx = 0;
      qp->rnr_deadline = Clock::now() + rnr_delay(h.flags);
      return;
    case NakCode::kRemoteAccess:
      fail_head(qp, IBV_WC_REM_ACCESS_ERR);
      return;
    case NakCode::kInvalidRequest:
      fail_head(qp, IBV_WC_REM_INV_REQ_ERR);
      return;
    case NakCode::kRemoteOp:
      fail_head(qp, IBV_WC_REM_OP_ERR);
      return;
  }
  fail_head(qp, IBV_WC_BAD_RESP_ERR);
}

}  // namespace ramkv::rdma::emu
