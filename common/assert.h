// RAMKV_CHECK: assertions for programmer errors. They stay on in release builds
// (TigerBeetle). Bytes from the network or the disk must never reach a RAMKV_CHECK: those
// are checked and turned into Status::kFormatError or Status::kCorrupt instead.
#pragma once

namespace ramkv::internal {
[[noreturn]] void check_failed(const char* expr, const char* file, int line, const char* msg);
}  // namespace ramkv::internal

#define RAMKV_CHECK(cond)                                                  \
  do {                                                                     \
    if (__builtin_expect(!(cond), 0))                                      \
      ::ramkv::internal::check_failed(#cond, __FILE__, __LINE__, nullptr); \
  } while (0)

#define RAMKV_CHECK_MSG(cond, msg)                                       \
  do {                                                                   \
    if (__builtin_expect(!(cond), 0))                                    \
      ::ramkv::internal::check_failed(#cond, __FILE__, __LINE__, (msg)); \
  } while (0)
