// TempDir: a fresh directory under /tmp for one test, removed with everything in it when
// the TempDir goes out of scope. Shared by the tests that need real files (the
// coordinator's FileStore and service tests), so each does not carry its own copy.
#pragma once

#include <stdlib.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <string>

namespace ramkv::test {

struct TempDir {
  TempDir() {
    char tmpl[] = "/tmp/ramkv-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
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
