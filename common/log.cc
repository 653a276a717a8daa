#include "common/log.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/assert.h"

namespace ramkv {
namespace {

LogLevel initial_level() {
  const char* env = std::getenv("RAMKV_LOG_LEVEL");
  LogLevel level = LogLevel::kInfo;
  if (env != nullptr) parse_log_level(env, &level);
  return level;
}

std::atomic<int>& level_storage() {
  static std::atomic<int> level{static_cast<int>(initial_level())};
  return level;
}

const char* level_letter(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "D";
    case LogLevel::kInfo:
      return "I";
    case LogLevel::kWarning:
      return "W";
    case LogLevel::kError:
      return "E";
    case LogLevel::kSilent:
      break;
  }
  return "?";
}

void write_all(int fd, std::string_view text) {
  while (!text.empty()) {
    ssize_t n = ::write(fd, text.data(), text.size());
    if (n <= 0) return;  // Nowhere to report a failing stderr.
    text.remove_prefix(static_cast<size_t>(n));
  }
}

}  // namespace

LogLevel log_level() {
  return static_cast<LogLevel>(level_storage().load(std::memory_order_relaxed));
}

void set_log_level(LogLevel level) {
  level_storage().store(static_cast<int>(level), std::memory_order_relaxed);
}

bool parse_log_level(std::string_view text, LogLevel* level) {
  static constexpr std::pair<std::string_view, LogLevel> kNames[] = {
      {"debug", LogLevel::kDebug},
      {"info", LogLevel::kInfo},
      {"warning", LogLevel::kWarning},
      {"error", LogLevel::kError},
      {"silent", LogLevel::kSilent}};
  for (const auto& [name, value] : kNames) {
    if (text == name) {
      *level = value;
      return true;
    }
  }
  return false;
}

namespace internal {

void log_line(LogLevel level, const char* file, int line, std::string_view message) {
  using namespace std::chrono;
  auto now = duration_cast<microseconds>(steady_clock::now().time_since_epoch()).count();
  const char* base = std::strrchr(file, '/');
  base = base != nullptr ? base + 1 : file;
  std::string text = fmt::format("{} {}.{:06} {}:{}] {}\n", level_letter(level), now / 1000000,
                                 now % 1000000, base, line, message);
  write_all(STDERR_FILENO, text);
}

[[noreturn]] void check_failed(const char* expr, const char* file, int line, const char* msg) {
  std::fprintf(stderr, "F %s:%d] check failed: %s%s%s\n", file, line, expr,
               msg != nullptr ? ": " : "", msg != nullptr ? msg : "");
  std::fflush(stderr);
  std::abort();
}

}  // namespace internal
}  // namespace ramkv
