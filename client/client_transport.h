// make_transport(): the transport a Client sends its RPCs with, chosen by
// ClientOptions::transport (include/ramkv/client.h). The one place the client library
// makes a transport.
//
// The choice is the Client's own: "tcp" and "rdma" make a transport of that kind for this
// Client alone and never change the process-wide factory (common/transport.h,
// set_client_transport_factory), which an embedding program may have set for its own RPCs.
// Only "" (the default) follows that factory, so that programs which chose their transport
// at start with rdma::use_rdma (ramkv's servers, test fixtures) keep working unchanged.
//
// Thread: any; it touches no shared state besides what the transport constructors do.
#pragma once

#include <memory>
#include <string_view>

#include "common/result.h"
#include "common/transport.h"
#include "ramkv/client.h"

namespace ramkv::client {

// Whether this build of the client library can make `transport` ("", "tcp", "rdma").
bool transport_available(std::string_view transport);

// The transport for a Client with these options. kInvalidArgument for an unknown name, for
// "rdma" in a build without the RDMA transport, for an RDMA device name not found or a bad
// port; kUnavailable when there is no RDMA device or it cannot be opened. Each failure is
// logged with its reason (one line, LOG_ERROR).
Result<std::unique_ptr<ClientTransport>> make_transport(const ClientOptions& options);

}  // namespace ramkv::client
