// libFuzzer target for the master's request decoding: the first two bytes pick an
// opcode, the rest is the request body. The service owns tablets of tables 1-3 so that
// well-formed prefixes reach the storage engine. Any crash, sanitizer report or abort
// is a bug: request bytes must only ever produce a status.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "master/master_service.h"

namespace {

ramkv::master::MasterService& service() {
  static auto* svc = [] {
    ramkv::master::MasterConfig cfg;
    cfg.memory_bytes = 16u << 20;
    cfg.segment_bytes = 1u << 20;
    cfg.seglet_bytes = 64u << 10;
    cfg.max_value_bytes = 64u << 10;
    cfg.max_key_bytes = 4u << 10;
    cfg.prefault_memory = false;
    auto created = ramkv::master::MasterService::create(cfg);
    if (!created.ok()) __builtin_trap();
    auto* s = created.value().release();
    std::vector<std::byte> body;
    ramkv::wire::BodyWriter w(&body);
    w.put(ramkv::wire::TabletListHeader{3});
    for (uint64_t t = 1; t <= 3; ++t) w.put(ramkv::wire::TabletWire{t, 0, UINT64_MAX, 1});
    ramkv::wire::MessageHeader h;
    h.opcode = static_cast<uint16_t>(ramkv::wire::Opcode::kTakeTablets);
    ramkv::Reply reply;
    s->handle(h, body, reply);
    return s;
  }();
  return *svc;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  uint16_t opcode;
  std::memcpy(&opcode, data, 2);
  // Keep the fuzzer on the request decoders: tablet drops would only shrink coverage.
  static constexpr uint16_t kOpcodes[] = {1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 40, 41};
  ramkv::wire::MessageHeader h;
  h.opcode = kOpcodes[opcode % (sizeof(kOpcodes) / sizeof(kOpcodes[0]))];
  std::span<const std::byte> body(reinterpret_cast<const std::byte*>(data + 2), size - 2);
  h.body_bytes = static_cast<uint32_t>(body.size());
  ramkv::Reply reply;
  service().handle(h, body, reply);
  return 0;
}
