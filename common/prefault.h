// Touching memory before the hot path needs it, from user space and from the kernel.
//
// Why both: on the virtual machines we measure on, the first access to a page costs a
// fault of its own in each mode (REFERENCE-FIGURES.md: memory touched for the first time
// is slow here). A page written only from user space still costs the kernel about as
// much the first time it copies into or out of it (recv, send, read): measured on 512
// MiB of user-written buffers, a first pass of recv() into them ran at 520-600 MB/s, the
// next ones at 4.6-5.6 GB/s, and reading /dev/zero into them once first made the first
// pass fast as well. On bare metal both passes cost about a memset.
#pragma once

#include <cstddef>
#include <span>

namespace ramkv {

// Stores a zero in every page of `memory` (user space). Only for memory whose contents
// do not matter or are zero.
void touch_from_user(std::span<std::byte> memory);
// Has the kernel write every page of `memory` (read(2) from /dev/zero): overwrites it
// with zeros. Does nothing if /dev/zero cannot be opened (logged once).
void touch_from_kernel(std::span<std::byte> memory);

// Transparent huge pages: on these virtual machines a huge page costs one fault per 2 MiB
// and no first-touch penalty in either mode (docs/recovery.md), so large buffers that the
// kernel copies into or out of ask for them.
constexpr size_t kHugePageBytes = size_t{2} << 20;
// Whether the kernel gives huge pages to memory that asks for them (madvise) or to all:
// not "never", and the switch exists. Read once.
bool transparent_huge_pages_enabled();
// Asks for huge pages for `memory` (2 MiB-aligned to get them all); true if the kernel
// will give them: the advice was taken and transparent huge pages are enabled.
bool advise_huge_pages(std::span<std::byte> memory);

}  // namespace ramkv
