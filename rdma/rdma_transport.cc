#include "rdma/rdma_transport.h"

// The transport's server is in rdma_server.cc, its client in rdma_client.cc, what they
// share in verbs_link.h.

namespace ramkv::rdma {

bool rdma_built() { return true; }

std::string_view rdma_provider() {
#ifdef RAMKV_VERBS_EMULATED
  return "emulated verbs (rdma/emu)";
#else
  return "libibverbs";
#endif
}

}  // namespace ramkv::rdma
