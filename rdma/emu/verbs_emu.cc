// Verbs emulation: a stand-in for libibverbs that test builds link instead of the real
// library, so a whole local cluster can run `--transport rdma` on a machine without an
// RDMA device (CI). It is an EMULATION: no adapter, no kernel driver, no offload.
// docs/rdma-emulation.md is the user's guide; this comment is the implementer's.
//
// What it is. The library exports the symbols that a program compiled against
// rdma-core 44's <infiniband/verbs.h> references (ibv_get_device_list, ibv_open_device,
// ibv_reg_mr and ibv_reg_mr_iova2, ibv_query_port, ibv_create_qp, ...) and fills the
// context's ops table (post_send, post_recv, post_srq_recv, poll_cq, req_notify_cq) and
// the verbs_context extension (query_port), which the header's static inline functions
// call through. It lists one device, "ramkv_verbs_emu0", with one InfiniBand port.
//
// How it works. Each process that opens the device gets a Nic (emu_nic.h) with its own
// thread and a LID, unique among the processes sharing the emulation directory
// ($RAMKV_VERBS_EMU_DIR, default /tmp/ramkv-verbs-emu-<uid>): the LID is held with
// flock() on lid-<N>.lock, so a process that dies frees it. Peers exchange frames
// (emu_wire.h) over Unix-domain stream sockets named lid-<N>.sock. The requester's NIC
// thread gathers local memory (lkey-checked) and sends it; the responder's NIC thread
// checks the rkey, bounds and access and copies into registered memory, answers READs,
// consumes receives and acknowledges. The responder's application threads never run
// for one-sided operations.
//
// Semantics kept from hardware (reliable connected queue pairs only):
//   - The RC state machine RESET -> INIT -> RTR -> RTS, any -> ERR / RESET, with the
//     attribute masks the kernel requires for each transition (EINVAL otherwise).
//   - Requests of one QP execute and complete in order; RDMA WRITE data is placed before
//     a later SEND of the same QP is delivered. Selective signalling (sq_sig_all = 0):
//     unsignalled requests produce no completion, and their send-queue slots are freed
//     only when a later signalled completion is polled (as on hardware).
//   - Errors: bad rkey, out of bounds, or access not granted -> IBV_WC_REM_ACCESS_ERR at
//     the requester and both QPs in ERR; no receive posted -> RNR NAK with the
//     responder's min_rnr_timer, retried rnr_retry times (7 = forever), then
//     IBV_WC_RNR_RETRY_EXC_ERR; a message larger than the receive -> IBV_WC_LOC_LEN_ERR
//     at the responder, IBV_WC_REM_INV_REQ_ERR at the requester; a peer that does not
//     answer (process dead, QP destroyed or not in RTR) -> retransmission every
//     timeout interval, retry_cnt times, then IBV_WC_RETRY_EXC_ERR; local lkey or length
//     errors -> IBV_WC_LOC_PROT_ERR / IBV_WC_LOC_LEN_ERR. A QP in ERR completes every
//     outstanding and later request with IBV_WC_WR_FLUSH_ERR, receives included (the
//     first error and flushed requests complete even when unsignalled, as rxe does).
//
// Limits (differences from hardware):
//   - Timing: every byte is copied through a socket by a thread; latency is tens of
//     microseconds and bandwidth a few GB/s at best. Never benchmark on it.
//   - The ack timeout interval (4.096 us * 2^timeout) is clamped to [20 ms, 500 ms], and
//     timeout 0 (infinite on hardware) means 500 ms, so a dead peer is always noticed.
//   - Only RC; no atomics, memory windows, UD, XRC, extended (ibv_*_ex) verbs, async
//     events (the async fd never becomes readable) or CQ resizing. A CQ overrun drops
//     the completion and logs a line instead of raising a CQ error.
//   - The memory is not pinned and not checked to be mapped: a bad address in an MR
//     crashes the NIC thread's process, as a real adapter would fault.
//   - After fork() the child does not inherit the parent's device: it must open the
//     device again (it gets its own NIC and LID).
#include <endian.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "rdma/emu/emu_nic.h"

// The header maps these names to inline wrappers; the library defines the real symbols.
#undef ibv_reg_mr
#undef ibv_reg_mr_iova
#undef ibv_query_port
#undef ibv_get_device_list

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace ramkv::rdma::emu {
namespace {

// The context the library hands out: verbs_context (whose last member is the
// ibv_context) so that the header's verbs_get_ctx_op() finds query_port.
struct EmuContext {
  verbs_context vctx;
  Nic* nic;
};

EmuContext* emu_context(ibv_context* context) {
  auto* bytes = reinterpret_cast<uint8_t*>(context) - offsetof(verbs_context, context);
  return reinterpret_cast<EmuContext*>(bytes);
}

Nic* nic_of(ibv_context* context) { return emu_context(context)->nic; }

ibv_device* emu_device() {
  static ibv_device device = [] {
    ibv_device d{};
    d.node_type = IBV_NODE_CA;
    d.transport_type = IBV_TRANSPORT_IB;
    std::snprintf(d.name, sizeof(d.name), "%s", kDeviceName);
    std::snprintf(d.dev_name, sizeof(d.dev_name), "uverbs_emu0");
    std::snprintf(d.dev_path, sizeof(d.dev_path), "(ramkv verbs emulation)");
    std::snprintf(d.ibdev_path, sizeof(d.ibdev_path), "(ramkv verbs emulation)");
    return d;
  }();
  return &device;
}

// Completion queues by id, for the events in channel pipes (an event of a destroyed CQ
// is skipped).
std::mutex g_cq_registry_mu;
std::unordered_map<uint64_t, Cq*> g_cq_registry;
uint64_t g_next_cq_id = 1;

// "ramkv" and the process id: one adapter per process, as one LID per process.
uint64_t node_guid() {
  return 0x72616d6b76000000ull | (static_cast<uint64_t>(::getpid()) & 0xffffff);
}

void fill_port_attr(Nic* nic, ibv_port_attr* attr) {
  attr->state = IBV_PORT_ACTIVE;
  attr->max_mtu = IBV_MTU_4096;
  attr->active_mtu = IBV_MTU_4096;
  attr->gid_tbl_len = 1;
  attr->port_cap_flags = 0;
  attr->max_msg_sz = kMaxMessageBytes;
  attr->pkey_tbl_len = 1;
  attr->lid = nic->lid();
  attr->sm_lid = 1;
  attr->lmc = 0;
  attr->max_vl_num = 1;
  attr->subnet_timeout = 18;
  attr->active_width = 2;   // 4x
  attr->active_speed = 32;  // FDR10-ish; the emulation has no real speed
  attr->phys_state = 5;     // LinkUp
  attr->link_layer = IBV_LINK_LAYER_INFINIBAND;
}

int query_port_op(ibv_context* context, uint8_t port_num, ibv_port_attr* attr, size_t attr_bytes) {
  if (port_num != 1) return EINVAL;
  ibv_port_attr full{};
  fill_port_attr(nic_of(context), &full);
  std::memcpy(attr, &full, std::min(attr_bytes, sizeof(full)));
  return 0;
}

int poll_cq_op(ibv_cq* ibcq, int num_entries, ibv_wc* wc) {
  Cq* cq = from_ibv<Cq>(ibcq);
  std::lock_guard<std::mutex> lock(cq->mu);
  int count = 0;
  while (count < num_entries && !cq->entries.empty()) {
    Cqe& e = cq->entries.front();
    wc[count++] = e.wc;
    if (e.sq_retired) e.sq_retired->store(e.sq_seq, std::memory_order_release);
    cq->entries.pop_front();
  }
  return count;
}

int req_notify_cq_op(ibv_cq* ibcq, int solicited_only) {
  Cq* cq = from_ibv<Cq>(ibcq);
  std::lock_guard<std::mutex> lock(cq->mu);
  // Arming again before an event only widens what it waits for.
  cq->solicited_only =
      cq->armed ? (cq->solicited_only && solicited_only != 0) : solicited_only != 0;
  cq->armed = true;
  return 0;
}

int post_send_op(ibv_qp* ibqp, ibv_send_wr* wr, ibv_send_wr** bad_wr) {
  Qp* qp = from_ibv<Qp>(ibqp);
  return qp->nic->post_send(qp, wr, bad_wr);
}

int post_recv_op(ibv_qp* ibqp, ibv_recv_wr* wr, ibv_recv_wr** bad_wr) {
  Qp* qp = from_ibv<Qp>(ibqp);
  return qp->nic->post_recv(qp, wr, bad_wr);
}

int post_srq_recv_op(ibv_srq* ibsrq, ibv_recv_wr* wr, ibv_recv_wr** bad_wr) {
  Srq* srq = from_ibv<Srq>(ibsrq);
  return srq->nic->post_srq_recv(srq, wr, bad_wr);
}

bool devices_hidden() {
  const char* value = std::getenv("RAMKV_VERBS_EMU_DEVICES");
  return value != nullptr && std::strcmp(value, "0") == 0;
}

}  // namespace
}  // namespace ramkv::rdma::emu

using namespace ramkv::rdma::emu;

// ---- Devices and contexts ------------------------------------------------------------

EMU_EXPORT ibv_device** ibv_get_device_list(int* num_devices) {
  // RAMKV_VERBS_EMU_DEVICES=0 hides the device, to test "no RDMA device" paths.
  const int count = devices_hidden() ? 0 : 1;
  auto** list = static_cast<ibv_device**>(std::calloc(2, sizeof(ibv_device*)));
  if (list == nullptr) {
    errno = ENOMEM;
    return nullptr;
  }
  if (count == 1) list[0] = emu_device();
  if (num_devices != nullptr) *num_devices = count;
  return list;
}

EMU_EXPORT void ibv_free_device_list(ibv_device** list) { std::free(list); }

EMU_EXPORT const char* ibv_get_device_name(ibv_device* device) {
  return device == nullptr ? nullptr : device->name;
}

EMU_EXPORT __be64 ibv_get_device_guid(ibv_device* device) {
  (void)device;
  return htobe64(node_guid());
}

EMU_EXPORT int ibv_get_device_index(ibv_device* device) { return device == emu_device() ? 0 : -1; }

EMU_EXPORT ibv_context* ibv_open_device(ibv_device* device) {
  if (device != emu_device()) {
    errno = ENODEV;
    return nullptr;
  }
  Nic* nic = Nic::acquire();
  if (nic == nullptr) return nullptr;
  auto* ctx = new EmuContext{};
  ctx->nic = nic;
  ctx->vctx.sz = sizeof(verbs_context);
  ctx->vctx.query_port = query_port_op;
  ibv_context& c = ctx->vctx.context;
  c.device = device;
  c.ops.poll_cq = poll_cq_op;
  c.ops.req_notify_cq = req_notify_cq_op;
  c.ops.post_send = post_send_op;
  c.ops.post_recv = post_recv_op;
  c.ops.post_srq_recv = post_srq_recv_op;
  c.cmd_fd = -1;
  // Async events are not emulated: an eventfd that never becomes readable, so that
  // programs can still put it in their epoll set.
  c.async_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  c.num_comp_vectors = 1;
  pthread_mutex_init(&c.mutex, nullptr);
  c.abi_compat = reinterpret_cast<void*>(std::numeric_limits<uintptr_t>::max());
  return &c;
}

EMU_EXPORT int ibv_close_device(ibv_context* context) {
  EmuContext* ctx = emu_context(context);
  if (context->async_fd >= 0) ::close(context->async_fd);
  pthread_mutex_destroy(&context->mutex);
  Nic* nic = ctx->nic;
  delete ctx;
  Nic::release(nic);
  return 0;
}

EMU_EXPORT int ibv_query_device(ibv_context* context, ibv_device_attr* attr) {
  (void)context;  // one device, one adapter per process
  std::memset(attr, 0, sizeof(*attr));
  std::snprintf(attr->fw_ver, sizeof(attr->fw_ver), "ramkv verbs emulation 1");
  attr->node_guid = htobe64(node_guid());
  attr->sys_image_guid = attr->node_guid;
  attr->max_mr_size = uint64_t{1} << 40;
  attr->page_size_cap = 4096;
  attr->vendor_id = 0;
  attr->vendor_part_id = 0;
  attr->hw_ver = 1;
  attr->max_qp = 1 << 16;
  attr->max_qp_wr = static_cast<int>(kMaxQpWr);
  attr->device_cap_flags = IBV_DEVICE_RC_RNR_NAK_GEN | IBV_DEVICE_SRQ_RESIZE;
  attr->max_sge = static_cast<int>(kMaxSge);
  attr->max_sge_rd = static_cast<int>(kMaxSge);
  attr->max_cq = 1 << 16;
  attr->max_cqe = static_cast<int>(kMaxCqe);
  attr->max_mr = 1 << 20;
  attr->max_pd = 1 << 16;
  attr->max_qp_rd_atom = static_cast<int>(kMaxRdAtomic);
  attr->max_qp_init_rd_atom = static_cast<int>(kMaxRdAtomic);
  attr->max_res_rd_atom = static_cast<int>(kMaxRdAtomic) * (1 << 16);
  attr->atomic_cap = IBV_ATOMIC_NONE;
  attr->max_srq = 1 << 16;
  attr->max_srq_wr = static_cast<int>(kMaxQpWr);
  attr->max_srq_sge = static_cast<int>(kMaxSge);
  attr->max_pkeys = 1;
  attr->local_ca_ack_delay = 16;
  attr->phys_port_cnt = 1;
  return 0;
}

// The pre-extension entry point (a program whose context lacks verbs_context, or one
// calling the symbol directly): the old structure is ibv_port_attr up to link_layer.
EMU_EXPORT int ibv_query_port(ibv_context* context, uint8_t port_num,
                              struct _compat_ibv_port_attr* port_attr) {
  return query_port_op(context, port_num, reinterpret_cast<ibv_port_attr*>(port_attr),
                       offsetof(ibv_port_attr, flags));
}

EMU_EXPORT int ibv_query_gid(ibv_context* context, uint8_t port_num, int index, ibv_gid* gid) {
  if (port_num != 1 || index != 0) {
    errno = EINVAL;
    return -1;
  }
  gid->global.subnet_prefix = htobe64(0xfe80000000000000ull);
  // The interface id names the LID, so that the GID is unique per process too.
  gid->global.interface_id = htobe64(0x72616d6b76000000ull | nic_of(context)->lid());
  return 0;
}

EMU_EXPORT int ibv_query_pkey(ibv_context* context, uint8_t port_num, int index, __be16* pkey) {
  (void)context;
  if (port_num != 1 || index != 0) return -1;
  *pkey = htobe16(0xffff);
  return 0;
}

// ---- Protection domains and memory regions -------------------------------------------

EMU_EXPORT ibv_pd* ibv_alloc_pd(ibv_context* context) {
  Nic* nic = nic_of(context);
  auto* pd = new Pd{};
  pd->nic = nic;
  pd->ibv.context = context;
  std::lock_guard<std::mutex> lock(nic->mu_);
  pd->ibv.handle = nic->next_handle_++;
  return &pd->ibv;
}

EMU_EXPORT int ibv_dealloc_pd(ibv_pd* ibpd) {
  Pd* pd = from_ibv<Pd>(ibpd);
  {
    std::lock_guard<std::mutex> lock(pd->nic->mu_);
    if (pd->use_count > 0) return EBUSY;
  }
  delete pd;
  return 0;
}

EMU_EXPORT ibv_mr* ibv_reg_mr_iova2(ibv_pd* ibpd, void* addr, size_t length, uint64_t iova,
                                    unsigned int access) {
  Pd* pd = from_ibv<Pd>(ibpd);
  constexpr unsigned kSupported = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
                                  IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC |
                                  IBV_ACCESS_RELAXED_ORDERING;
  // Remote write needs local write, as on hardware; the optional range is ignored.
  const unsigned known = access & ~static_cast<unsigned>(IBV_ACCESS_OPTIONAL_RANGE);
  const bool remote_write = (access & IBV_ACCESS_REMOTE_WRITE) != 0;
  if ((known & ~kSupported) != 0 || (addr == nullptr && length > 0) ||
      (remote_write && (access & IBV_ACCESS_LOCAL_WRITE) == 0) || length > (uint64_t{1} << 40)) {
    errno = EINVAL;
    return nullptr;
  }
  auto* mr = new Mr{};
  mr->nic = pd->nic;
  mr->iova = iova;
  mr->access = access;
  mr->ibv.context = ibpd->context;
  mr->ibv.pd = ibpd;
  mr->ibv.addr = addr;
  mr->ibv.length = length;
  Nic* nic = pd->nic;
  std::lock_guard<std::mutex> lock(nic->mu_);
  uint32_t key = nic->next_key_++;
  if (key == 0) key = nic->next_key_++;
  mr->ibv.handle = nic->next_handle_++;
  mr->ibv.lkey = key;
  mr->ibv.rkey = key;
  nic->mrs_[key] = mr;
  pd->use_count++;
  return &mr->ibv;
}

EMU_EXPORT ibv_mr* ibv_reg_mr(ibv_pd* pd, void* addr, size_t length, int access) {
  return ibv_reg_mr_iova2(pd, addr, length, reinterpret_cast<uintptr_t>(addr),
                          static_cast<unsigned>(access));
}

EMU_EXPORT ibv_mr* ibv_reg_mr_iova(ibv_pd* pd, void* addr, size_t length, uint64_t iova,
                                   int access) {
  return ibv_reg_mr_iova2(pd, addr, length, iova, static_cast<unsigned>(access));
}

EMU_EXPORT int ibv_dereg_mr(ibv_mr* ibmr) {
  Mr* mr = from_ibv<Mr>(ibmr);
  Nic* nic = mr->nic;
  {
    std::lock_guard<std::mutex> lock(nic->mu_);
    nic->mrs_.erase(ibmr->lkey);
    from_ibv<Pd>(ibmr->pd)->use_count--;
  }
  delete mr;
  return 0;
}

// ---- Completion channels and queues --------------------------------------------------

EMU_EXPORT ibv_comp_channel* ibv_create_comp_channel(ibv_context* context) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return nullptr;
  // Events are written by the NIC thread, which must never block on a full pipe (there
  // is at most one unread event per armed CQ, so it does not fill).
  ::fcntl(fds[1], F_SETFL, O_NONBLOCK);
  auto* channel = new Channel{};
  channel->ibv.context = context;
  channel->ibv.fd = fds[0];
  channel->ibv.refcnt = 0;
  channel->write_fd = fds[1];
  return &channel->ibv;
}

EMU_EXPORT int ibv_destroy_comp_channel(ibv_comp_channel* ibchannel) {
  Channel* channel = from_ibv<Channel>(ibchannel);
  {
    std::lock_guard<std::mutex> lock(nic_of(ibchannel->context)->mu_);
    if (channel->cq_count > 0) return EBUSY;
  }
  ::close(channel->ibv.fd);
  ::close(channel->write_fd);
  delete channel;
  return 0;
}

EMU_EXPORT ibv_cq* ibv_create_cq(ibv_context* context, int cqe, void* cq_context,
                                 ibv_comp_channel* channel, int comp_vector) {
  if (cqe < 1 || static_cast<uint32_t>(cqe) > kMaxCqe || comp_vector != 0) {
    errno = EINVAL;
    return nullptr;
  }
  Nic* nic = nic_of(context);
  auto* cq = new Cq{};
  cq->nic = nic;
  cq->capacity = static_cast<uint32_t>(cqe);
  cq->ibv.context = context;
  cq->ibv.channel = channel;
  cq->ibv.cq_context = cq_context;
  cq->ibv.cqe = cqe;
  pthread_mutex_init(&cq->ibv.mutex, nullptr);
  pthread_cond_init(&cq->ibv.cond, nullptr);
  {
    std::lock_guard<std::mutex> lock(nic->mu_);
    cq->ibv.handle = nic->next_handle_++;
    if (channel != nullptr) from_ibv<Channel>(channel)->cq_count++;
  }
  std::lock_guard<std::mutex> lock(g_cq_registry_mu);
  cq->id = g_next_cq_id++;
  g_cq_registry[cq->id] = cq;
  return &cq->ibv;
}

EMU_EXPORT int ibv_destroy_cq(ibv_cq* ibcq) {
  Cq* cq = from_ibv<Cq>(ibcq);
  {
    std::lock_guard<std::mutex> lock(cq->nic->mu_);
    if (cq->use_count > 0) return EBUSY;
    if (ibcq->channel != nullptr) from_ibv<Channel>(ibcq->channel)->cq_count--;
  }
  {
    std::lock_guard<std::mutex> lock(g_cq_registry_mu);
    g_cq_registry.erase(cq->id);
  }
  {
    // As libibverbs: wait until every event handed out has been acknowledged.
    std::unique_lock<std::mutex> lock(cq->mu);
    cq->acked_cv.wait(lock, [cq] { return cq->events_acked >= cq->events_delivered; });
  }
  pthread_mutex_destroy(&cq->ibv.mutex);
  pthread_cond_destroy(&cq->ibv.cond);
  delete cq;
  return 0;
}

EMU_EXPORT int ibv_resize_cq(ibv_cq* cq, int cqe) {
  (void)cq;
  (void)cqe;
  return EOPNOTSUPP;
}

EMU_EXPORT int ibv_get_cq_event(ibv_comp_channel* channel, ibv_cq** cq_out, void** cq_context) {
  for (;;) {
    uint64_t id = 0;
    const ssize_t n = ::read(channel->fd, &id, sizeof(id));
    if (n < 0) return -1;  // errno from read: EAGAIN on a non-blocking fd
    if (n != static_cast<ssize_t>(sizeof(id))) {
      errno = EIO;
      return -1;
    }
    std::lock_guard<std::mutex> lock(g_cq_registry_mu);
    auto it = g_cq_registry.find(id);
    if (it == g_cq_registry.end()) continue;  // the CQ was destroyed since
    Cq* cq = it->second;
    {
      std::lock_guard<std::mutex> cq_lock(cq->mu);
      cq->events_delivered++;
    }
    *cq_out = &cq->ibv;
    *cq_context = cq->ibv.cq_context;
    return 0;
  }
}

EMU_EXPORT void ibv_ack_cq_events(ibv_cq* ibcq, unsigned int nevents) {
  Cq* cq = from_ibv<Cq>(ibcq);
  std::lock_guard<std::mutex> lock(cq->mu);
  cq->events_acked += nevents;
  cq->acked_cv.notify_all();
}

// ---- Shared receive queues -----------------------------------------------------------

EMU_EXPORT ibv_srq* ibv_create_srq(ibv_pd* ibpd, ibv_srq_init_attr* init) {
  Pd* pd = from_ibv<Pd>(ibpd);
  if (init->attr.max_wr < 1 || init->attr.max_wr > kMaxQpWr || init->attr.max_sge < 1 ||
      init->attr.max_sge > kMaxSge) {
    errno = EINVAL;
    return nullptr;
  }
  auto* srq = new Srq{};
  srq->nic = pd->nic;
  srq->pd = pd;
  srq->max_wr = init->attr.max_wr;
  srq->max_sge = init->attr.max_sge;
  srq->ibv.context = ibpd->context;
  srq->ibv.srq_context = init->srq_context;
  srq->ibv.pd = ibpd;
  pthread_mutex_init(&srq->ibv.mutex, nullptr);
  pthread_cond_init(&srq->ibv.cond, nullptr);
  std::lock_guard<std::mutex> lock(pd->nic->mu_);
  srq->ibv.handle = pd->nic->next_handle_++;
  pd->use_count++;
  return &srq->ibv;
}

EMU_EXPORT int ibv_modify_srq(ibv_srq* srq, ibv_srq_attr* attr, int mask) {
  (void)srq;
  (void)attr;
  // The limit event is not emulated, and neither is resizing.
  return mask == 0 ? 0 : EOPNOTSUPP;
}

EMU_EXPORT int ibv_query_srq(ibv_srq* ibsrq, ibv_srq_attr* attr) {
  Srq* srq = from_ibv<Srq>(ibsrq);
  attr->max_wr = srq->max_wr;
  attr->max_sge = srq->max_sge;
  attr->srq_limit = 0;
  return 0;
}

EMU_EXPORT int ibv_destroy_srq(ibv_srq* ibsrq) {
  Srq* srq = from_ibv<Srq>(ibsrq);
  {
    std::lock_guard<std::mutex> lock(srq->nic->mu_);
    if (srq->use_count > 0) return EBUSY;
    srq->pd->use_count--;
  }
  pthread_mutex_destroy(&srq->ibv.mutex);
  pthread_cond_destroy(&srq->ibv.cond);
  delete srq;
  return 0;
}

// ---- Queue pairs ---------------------------------------------------------------------

EMU_EXPORT ibv_qp* ibv_create_qp(ibv_pd* ibpd, ibv_qp_init_attr* init) {
  Pd* pd = from_ibv<Pd>(ibpd);
  Nic* nic = pd->nic;
  const ibv_qp_cap& cap = init->cap;
  if (init->qp_type != IBV_QPT_RC) {
    errno = EOPNOTSUPP;  // the emulation has reliable connected QPs only
    return nullptr;
  }
  if (init->send_cq == nullptr || init->recv_cq == nullptr || cap.max_send_wr < 1 ||
      cap.max_send_wr > kMaxQpWr || cap.max_send_sge > kMaxSge ||
      cap.max_inline_data > kMaxInlineData ||
      (init->srq == nullptr && (cap.max_recv_wr > kMaxQpWr || cap.max_recv_sge > kMaxSge))) {
    errno = EINVAL;
    return nullptr;
  }
  auto* qp = new Qp{};
  qp->nic = nic;
  qp->pd = pd;
  qp->send_cq = from_ibv<Cq>(init->send_cq);
  qp->recv_cq = from_ibv<Cq>(init->recv_cq);
  qp->srq = init->srq != nullptr ? from_ibv<Srq>(init->srq) : nullptr;
  qp->cap = cap;
  if (qp->srq != nullptr) {
    qp->cap.max_recv_wr = 0;
    qp->cap.max_recv_sge = 0;
  }
  if (qp->cap.max_send_sge == 0) qp->cap.max_send_sge = 1;
  init->cap = qp->cap;
  qp->sq_sig_all = init->sq_sig_all != 0;
  qp->ibv.context = ibpd->context;
  qp->ibv.qp_context = init->qp_context;
  qp->ibv.pd = ibpd;
  qp->ibv.send_cq = init->send_cq;
  qp->ibv.recv_cq = init->recv_cq;
  qp->ibv.srq = init->srq;
  qp->ibv.state = IBV_QPS_RESET;
  qp->ibv.qp_type = IBV_QPT_RC;
  pthread_mutex_init(&qp->ibv.mutex, nullptr);
  pthread_cond_init(&qp->ibv.cond, nullptr);
  std::lock_guard<std::mutex> lock(nic->mu_);
  uint32_t qpn = nic->next_qpn_++ & kPsnMask;
  while (qpn < 2 || nic->qps_.count(qpn) != 0) qpn = nic->next_qpn_++ & kPsnMask;
  qp->ibv.qp_num = qpn;
  qp->ibv.handle = nic->next_handle_++;
  nic->qps_[qpn] = qp;
  pd->use_count++;
  qp->send_cq->use_count++;
  qp->recv_cq->use_count++;
  if (qp->srq != nullptr) qp->srq->use_count++;
  return &qp->ibv;
}

EMU_EXPORT int ibv_modify_qp(ibv_qp* ibqp, ibv_qp_attr* attr, int attr_mask) {
  Qp* qp = from_ibv<Qp>(ibqp);
  return qp->nic->modify_qp(qp, *attr, attr_mask);
}

EMU_EXPORT int ibv_query_qp(ibv_qp* ibqp, ibv_qp_attr* attr, int attr_mask,
                            ibv_qp_init_attr* init_attr) {
  (void)attr_mask;  // everything is filled in
  Qp* qp = from_ibv<Qp>(ibqp);
  std::lock_guard<std::mutex> lock(qp->nic->mu_);
  *attr = qp->attr;
  attr->qp_state = ibqp->state;
  attr->cur_qp_state = ibqp->state;
  attr->cap = qp->cap;
  if (init_attr != nullptr) {
    *init_attr = ibv_qp_init_attr{};
    init_attr->qp_context = ibqp->qp_context;
    init_attr->send_cq = ibqp->send_cq;
    init_attr->recv_cq = ibqp->recv_cq;
    init_attr->srq = ibqp->srq;
    init_attr->cap = qp->cap;
    init_attr->qp_type = IBV_QPT_RC;
    init_attr->sq_sig_all = qp->sq_sig_all ? 1 : 0;
  }
  return 0;
}

EMU_EXPORT int ibv_destroy_qp(ibv_qp* ibqp) {
  Qp* qp = from_ibv<Qp>(ibqp);
  {
    // Outstanding requests vanish without completions, as on hardware; the peer's
    // requests to this QP go unanswered from now on.
    std::lock_guard<std::mutex> lock(qp->nic->mu_);
    qp->nic->qps_.erase(ibqp->qp_num);
    qp->pd->use_count--;
    qp->send_cq->use_count--;
    qp->recv_cq->use_count--;
    if (qp->srq != nullptr) qp->srq->use_count--;
  }
  pthread_mutex_destroy(&ibqp->mutex);
  pthread_cond_destroy(&ibqp->cond);
  delete qp;
  return 0;
}

// ---- Events, fork, strings -----------------------------------------------------------

EMU_EXPORT int ibv_get_async_event(ibv_context* context, ibv_async_event* event) {
  (void)event;
  // No async events are emulated: the fd never fires, so a blocking caller waits for
  // ever (as with a healthy device) and a non-blocking one gets EAGAIN.
  if ((::fcntl(context->async_fd, F_GETFL) & O_NONBLOCK) == 0) {
    pollfd pfd{.fd = context->async_fd, .events = POLLIN, .revents = 0};
    while (::poll(&pfd, 1, -1) >= 0 || errno == EINTR) {
    }
  }
  errno = EAGAIN;
  return -1;
}

EMU_EXPORT void ibv_ack_async_event(ibv_async_event* event) { (void)event; }

EMU_EXPORT int ibv_fork_init(void) { return 0; }

EMU_EXPORT ibv_fork_status ibv_is_fork_initialized(void) { return IBV_FORK_UNNEEDED; }

EMU_EXPORT const char* ibv_wc_status_str(ibv_wc_status status) {
  switch (status) {
    case IBV_WC_SUCCESS:
      return "success";
    case IBV_WC_LOC_LEN_ERR:
      return "local length error";
    case IBV_WC_LOC_QP_OP_ERR:
      return "local QP operation error";
    case IBV_WC_LOC_EEC_OP_ERR:
      return "local EE context operation error";
    case IBV_WC_LOC_PROT_ERR:
      return "local protection error";
    case IBV_WC_WR_FLUSH_ERR:
      return "Work Request Flushed Error";
    case IBV_WC_MW_BIND_ERR:
      return "memory management operation error";
    case IBV_WC_BAD_RESP_ERR:
      return "bad response error";
    case IBV_WC_LOC_ACCESS_ERR:
      return "local access error";
    case IBV_WC_REM_INV_REQ_ERR:
      return "remote invalid request error";
    case IBV_WC_REM_ACCESS_ERR:
      return "remote access error";
    case IBV_WC_REM_OP_ERR:
      return "remote operation error";
    case IBV_WC_RETRY_EXC_ERR:
      return "transport retry counter exceeded";
    case IBV_WC_RNR_RETRY_EXC_ERR:
      return "RNR retry counter exceeded";
    case IBV_WC_LOC_RDD_VIOL_ERR:
      return "local RDD violation error";
    case IBV_WC_REM_INV_RD_REQ_ERR:
      return "remote invalid RD request";
    case IBV_WC_REM_ABORT_ERR:
      return "aborted error";
    case IBV_WC_INV_EECN_ERR:
      return "invalid EE context number";
    case IBV_WC_INV_EEC_STATE_ERR:
      return "invalid EE context state";
    case IBV_WC_FATAL_ERR:
      return "fatal error";
    case IBV_WC_RESP_TIMEOUT_ERR:
      return "response timeout error";
    case IBV_WC_GENERAL_ERR:
      return "general error";
    default:
      return "unknown";
  }
}

EMU_EXPORT const char* ibv_port_state_str(ibv_port_state state) {
  switch (state) {
    case IBV_PORT_NOP:
      return "PORT_NOP";
    case IBV_PORT_DOWN:
      return "PORT_DOWN";
    case IBV_PORT_INIT:
      return "PORT_INIT";
    case IBV_PORT_ARMED:
      return "PORT_ARMED";
    case IBV_PORT_ACTIVE:
      return "PORT_ACTIVE";
    case IBV_PORT_ACTIVE_DEFER:
      return "PORT_ACTIVE_DEFER";
    default:
      return "invalid state";
  }
}

EMU_EXPORT const char* ibv_node_type_str(ibv_node_type type) {
  return type == IBV_NODE_CA ? "InfiniBand channel adapter (ramkv verbs emulation)" : "unknown";
}

EMU_EXPORT const char* ibv_event_type_str(ibv_event_type event) {
  (void)event;
  return "async event (not emulated)";
}
