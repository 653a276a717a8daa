// Logging: one line per event, to stderr, with a level, a monotonic timestamp and the
// source location. Thread-safe: a line is written with one write(2) call.
#pragma once

#include <fmt/format.h>

#include <atomic>
#include <string_view>

namespace ramkv {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kSilent = 4 };

// The level below which lines are dropped; kInfo by default, RAMKV_LOG_LEVEL
// (debug|info|warning|error|silent) in the environment overrides it at start.
LogLevel log_level();
void set_log_level(LogLevel level);
// Parses "debug", "info", "warning", "error", "silent"; false if unknown.
bool parse_log_level(std::string_view text, LogLevel* level);

namespace internal {
void log_line(LogLevel level, const char* file, int line, std::string_view message);
}  // namespace internal

#define RAMKV_LOG(level, ...)                                                   \
  do {                                                                          \
    if (::ramkv::LogLevel::level >= ::ramkv::log_level())                       \
      ::ramkv::internal::log_line(::ramkv::LogLevel::level, __FILE__, __LINE__, \
                                  ::fmt::format(__VA_ARGS__));                  \
  } while (0)

// A line at a level chosen at run time (a failure that repeats, logged quietly after the
// first time).
#define RAMKV_LOG_AT(level_value, ...)                                  \
  do {                                                                  \
    const ::ramkv::LogLevel ramkv_log_level_ = (level_value);           \
    if (ramkv_log_level_ >= ::ramkv::log_level())                       \
      ::ramkv::internal::log_line(ramkv_log_level_, __FILE__, __LINE__, \
                                  ::fmt::format(__VA_ARGS__));          \
  } while (0)

#define LOG_DEBUG(...) RAMKV_LOG(kDebug, __VA_ARGS__)
#define LOG_INFO(...) RAMKV_LOG(kInfo, __VA_ARGS__)
#define LOG_WARNING(...) RAMKV_LOG(kWarning, __VA_ARGS__)
#define LOG_ERROR(...) RAMKV_LOG(kError, __VA_ARGS__)

}  // namespace ramkv
