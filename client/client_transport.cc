#include "client/client_transport.h"

#include <limits>
#include <string>

#include "common/log.h"
#ifdef RAMKV_HAVE_RDMA
#include "rdma/rdma_transport.h"
#endif

namespace ramkv::client {

bool transport_available(std::string_view transport) {
  if (transport.empty() || transport == "tcp") return true;
#ifdef RAMKV_HAVE_RDMA
  if (transport == "rdma") return rdma::rdma_built();
#endif
  return false;
}

namespace {

Result<std::unique_ptr<ClientTransport>> make_rdma(const ClientOptions& options,
                                                   const TransportOptions& t) {
#ifdef RAMKV_HAVE_RDMA
  if (options.rdma_port == 0 || options.rdma_port > std::numeric_limits<uint8_t>::max()) {
    LOG_ERROR("client: rdma_port {} is not a device port (1-255)", options.rdma_port);
    return Status::kInvalidArgument;
  }
  rdma::RdmaOptions r;
  r.device = options.rdma_device;
  r.port = static_cast<uint8_t>(options.rdma_port);
  // A client transport's receive pool, as rdma::use_rdma gives every client transport: a
  // process may hold many Clients, each with its own registered buffers.
  r.recv_buffers = r.client_recv_buffers;
  std::string why;  // make_rdma_client_transport logs it too
  auto made = rdma::make_rdma_client_transport(t, r, &why);
  if (!made.ok()) return made.status();
  return std::move(made).value();
#else
  (void)options;
  (void)t;
  LOG_ERROR(
      "client: transport \"rdma\": this build of the client library has no RDMA transport "
      "(the libibverbs headers were missing when it was built)");
  return Status::kInvalidArgument;
#endif
}

}  // namespace

Result<std::unique_ptr<ClientTransport>> make_transport(const ClientOptions& options) {
  TransportOptions t;
  t.busy_poll = options.busy_poll;
  if (options.transport.empty()) return make_client_transport(t);
  if (options.transport == "tcp") return make_tcp_client_transport(t);
  if (options.transport == "rdma") return make_rdma(options, t);
  LOG_ERROR("client: unknown transport \"{}\" (expected \"tcp\" or \"rdma\")", options.transport);
  return Status::kInvalidArgument;
}

}  // namespace ramkv::client
