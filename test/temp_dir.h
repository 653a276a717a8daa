// TempDir: a fresh directory (under /tmp by default) for one test, removed with everything in it
// when the TempDir goes out of scope. Shared by the tests that need real files (the coordinator's
// FileStore and service tests, the backup's replica files), so each does not carry its own copy.
#pragma once

#include <stdlib.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <string>

namespace ramkv::test {

struct TempDir {
  // `base` must be on a real disk for tests that use O_DIRECT (tmpfs refuses it): the
  // backup tests pass /var/tmp.
  explicit TempDir(const std::string& base = "/tmp") {
    std::string tmpl = base + "/ramkv-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;  // a destructor must not throw
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string path;
};

}  // namespace ramkv::test
