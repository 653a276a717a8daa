// The responder's side of the emulated adapter (verbs emulation; see emu_nic.h and the
// protocol summary in emu_qp.cc). Runs on the NIC thread only, with Nic::mu_ held: this
// is where one-sided operations touch the application's registered memory without the
// application running.
#include <cstring>

#include "rdma/emu/emu_nic.h"

namespace ramkv::rdma::emu {
namespace {

bool well_formed(const FrameHeader& h) {
  switch (static_cast<FrameType>(h.type)) {
    case FrameType::kSend:
    case FrameType::kSendImm:
      return h.length == h.payload_bytes;
    case FrameType::kWrite:
    case FrameType::kWriteImm:
      return h.length == h.payload_bytes;
    case FrameType::kReadReq:
      return h.payload_bytes == 0 && h.length <= kMaxMessageBytes;
    default:
      return false;
  }
}

}  // namespace

void Nic::on_request(const FrameHeader& h, const uint8_t* payload) {
  auto it = qps_.find(h.dst_qpn);
  if (it == qps_.end()) return;  // no such QP: silence, and the requester times out
  Qp* qp = it->second;
  const ibv_qp_state state = qp->ibv.state;
  // A QP that is not ready to receive, or is connected to another peer, drops the
  // request as hardware does.
  if ((state != IBV_QPS_RTR && state != IBV_QPS_RTS) || h.src_lid != qp->attr.ah_attr.dlid ||
      h.src_qpn != qp->attr.dest_qp_num || !well_formed(h)) {
    return;
  }
  const uint32_t distance = (h.psn - qp->expected_psn) & kPsnMask;
  if (distance == 0) {
    execute_request(qp, h, payload);
    return;
  }
  if (distance < 0x800000) return;  // ahead of a gap (after an RNR NAK): dropped
  // A duplicate (the requester retransmitted after a timeout): it was executed once;
  // acknowledge it again, and answer a READ again.
  if (static_cast<FrameType>(h.type) != FrameType::kReadReq) {
    respond(qp, h, FrameType::kAck, NakCode{}, nullptr, 0);
    return;
  }
  const uint8_t* src =
      h.length == 0 ? nullptr
                    : remote_range(qp, h.rkey, h.remote_addr, h.length, IBV_ACCESS_REMOTE_READ);
  if (h.length == 0 || src != nullptr)
    respond(qp, h, FrameType::kReadResp, NakCode{}, src, h.length);
}

RecvWqe* Nic::front_recv(Qp* qp) {
  std::deque<RecvWqe>& queue = qp->srq != nullptr ? qp->srq->wqes : qp->rq;
  return queue.empty() ? nullptr : &queue.front();
}

void Nic::pop_recv(Qp* qp) {
  std::deque<RecvWqe>& queue = qp->srq != nullptr ? qp->srq->wqes : qp->rq;
  queue.pop_front();
}

void Nic::execute_request(Qp* qp, const FrameHeader& h, const uint8_t* payload) {
  const auto type = static_cast<FrameType>(h.type);
  const bool needs_recv =
      type == FrameType::kSend || type == FrameType::kSendImm || type == FrameType::kWriteImm;
  RecvWqe* recv = needs_recv ? front_recv(qp) : nullptr;
  if (needs_recv && recv == nullptr) {
    // Receiver not ready: the requester waits our min_rnr_timer and sends again.
    respond(qp, h, FrameType::kNak, NakCode::kRnr, nullptr, 0);
    return;
  }
  if (type == FrameType::kSend || type == FrameType::kSendImm) {
    Pd* pd = qp->srq != nullptr ? qp->srq->pd : qp->pd;
    uint64_t room = 0;
    for (const ibv_sge& sge : recv->sges) room += sge.length;
    ibv_wc_status status = IBV_WC_SUCCESS;
    if (room < h.payload_bytes) {
      status = IBV_WC_LOC_LEN_ERR;
    } else {
      // Scatter; check each piece before writing any of it.
      uint32_t left = h.payload_bytes;
      for (const ibv_sge& sge : recv->sges) {
        if (left == 0) break;
        const ibv_sge piece{sge.addr, std::min(sge.length, left), sge.lkey};
        if (local_range(pd, piece, true) == nullptr) status = IBV_WC_LOC_PROT_ERR;
        left -= piece.length;
      }
    }
    if (status != IBV_WC_SUCCESS) {
      const RecvWqe failed = *recv;
      pop_recv(qp);
      complete_recv(qp, failed, status, IBV_WC_RECV, 0, 0, false, &h);
      // In ERR before the requester can learn of the error.
      to_error(qp);
      respond(qp, h, FrameType::kNak,
              status == IBV_WC_LOC_LEN_ERR ? NakCode::kInvalidRequest : NakCode::kRemoteOp, nullptr,
              0);
      return;
    }
    uint32_t left = h.payload_bytes;
    const uint8_t* in = payload;
    for (const ibv_sge& sge : recv->sges) {
      if (left == 0) break;
      const ibv_sge piece{sge.addr, std::min(sge.length, left), sge.lkey};
      std::memcpy(local_range(pd, piece, true), in, piece.length);
      in += piece.length;
      left -= piece.length;
    }
    const RecvWqe done = *recv;
    pop_recv(qp);
    complete_recv(qp, done, IBV_WC_SUCCESS, IBV_WC_RECV, h.payload_bytes, h.imm,
                  type == FrameType::kSendImm, &h);
    qp->expected_psn = (qp->expected_psn + 1) & kPsnMask;
    respond(qp, h, FrameType::kAck, NakCode{}, nullptr, 0);
    return;
  }
  const unsigned access =
      type == FrameType::kReadReq ? IBV_ACCESS_REMOTE_READ : IBV_ACCESS_REMOTE_WRITE;
  uint8_t* mem = nullptr;
  if (h.length > 0) {
    mem = remote_range(qp, h.rkey, h.remote_addr, h.length, access);
    if (mem == nullptr) {
      // An access violation is fatal for both QPs (the responder's gets
      // IBV_EVENT_QP_ACCESS_ERR on hardware; async events are not emulated).
      to_error(qp);
      respond(qp, h, FrameType::kNak, NakCode::kRemoteAccess, nullptr, 0);
      return;
    }
  }
  qp->expected_psn = (qp->expected_psn + 1) & kPsnMask;
  if (type == FrameType::kReadReq) {
    respond(qp, h, FrameType::kReadResp, NakCode{}, mem, h.length);
    return;
  }
  if (h.length > 0) std::memcpy(mem, payload, h.length);
  if (type == FrameType::kWriteImm) {
    const RecvWqe done = *recv;
    pop_recv(qp);
    complete_recv(qp, done, IBV_WC_SUCCESS, IBV_WC_RECV_RDMA_WITH_IMM, h.length, h.imm, true, &h);
  }
  respond(qp, h, FrameType::kAck, NakCode{}, nullptr, 0);
}

void Nic::respond(Qp* qp, const FrameHeader& request, FrameType type, NakCode code,
                  const uint8_t* data, uint32_t data_bytes) {
  std::vector<uint8_t> frame = make_frame(type, qp, request.psn, data_bytes);
  FrameHeader h;
  std::memcpy(&h, frame.data(), sizeof(h));
  h.dst_qpn = request.src_qpn;
  h.code = static_cast<uint8_t>(code);
  if (code == NakCode::kRnr) h.flags = qp->attr.min_rnr_timer;
  std::memcpy(frame.data(), &h, sizeof(h));
  if (data_bytes > 0) std::memcpy(frame.data() + sizeof(FrameHeader), data, data_bytes);
  send_frame(static_cast<uint16_t>(request.src_lid), std::move(frame));
}

}  // namespace ramkv::rdma::emu
