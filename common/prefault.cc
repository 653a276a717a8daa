#include "common/prefault.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>

#include "common/log.h"

namespace ramkv {

namespace {
constexpr size_t kPage = 4096;
}  // namespace

void touch_from_user(std::span<std::byte> memory) {
  for (size_t off = 0; off < memory.size(); off += kPage) {
    *reinterpret_cast<volatile std::byte*>(memory.data() + off) = std::byte{0};
  }
}

void touch_from_kernel(std::span<std::byte> memory) {
  const int fd = ::open("/dev/zero", O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    static std::atomic<bool> said{false};
    if (!said.exchange(true)) {
      LOG_WARNING("cannot open /dev/zero ({}): memory is not touched from the kernel in advance",
                  std::strerror(errno));
    }
    return;
  }
  size_t done = 0;
  while (done < memory.size()) {
    ssize_t n = ::read(fd, memory.data() + done, memory.size() - done);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      break;
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
}

bool transparent_huge_pages_enabled() {
  static const bool enabled = [] {
    std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string line;
    if (!std::getline(in, line)) return false;
    return line.find("[always]") != std::string::npos ||
           line.find("[madvise]") != std::string::npos;
  }();
  return enabled;
}

bool advise_huge_pages(std::span<std::byte> memory) {
  return !memory.empty() && ::madvise(memory.data(), memory.size(), MADV_HUGEPAGE) == 0 &&
         transparent_huge_pages_enabled();
}

}  // namespace ramkv
