#include "coordinator/external_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "common/checksum.h"
#include "test/temp_dir.h"

using namespace ramkv;
using namespace ramkv::coordinator;

namespace {

using ramkv::test::TempDir;

std::vector<std::byte> bytes_of(std::string_view s) {
  auto b = as_bytes(s);
  return {b.begin(), b.end()};
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void write_all(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

}  // namespace

TEST_CASE("file store: nothing stored yet reads as object not found", "[coordinator][store]") {
  TempDir dir;
  auto store = FileStore::open(dir.path + "/sub/dir");  // created if missing
  REQUIRE(store.ok());
  CHECK((*store)->get().status() == Status::kObjectNotFound);
}

TEST_CASE("file store: a put survives reopening and rewriting", "[coordinator][store]") {
  TempDir dir;
  {
    auto store = FileStore::open(dir.path);
    REQUIRE(store.ok());
    REQUIRE((*store)->put(bytes_of("first state")) == Status::kOk);
    REQUIRE((*store)->put(bytes_of("second, longer state")) == Status::kOk);
    REQUIRE((*store)->put(bytes_of("third")) == Status::kOk);
  }
  auto store = FileStore::open(dir.path);
  REQUIRE(store.ok());
  auto got = (*store)->get();
  REQUIRE(got.ok());
  CHECK(*got == bytes_of("third"));
  CHECK(!std::filesystem::exists((*store)->path() + ".tmp"));
  REQUIRE((*store)->put({}) == Status::kOk);  // an empty state is a state
  CHECK((*store)->get()->empty());
}

TEST_CASE("file store: a truncated state file is reported as corrupt", "[coordinator][store]") {
  TempDir dir;
  auto store = FileStore::open(dir.path);
  REQUIRE(store.ok());
  REQUIRE((*store)->put(bytes_of("a state worth keeping")) == Status::kOk);
  std::string full = read_all((*store)->path());
  for (size_t n = 0; n < full.size(); ++n) {
    write_all((*store)->path(), full.substr(0, n));
    CHECK((*store)->get().status() == Status::kCorrupt);
  }
  write_all((*store)->path(), full + "x");
  CHECK((*store)->get().status() == Status::kCorrupt);
}

TEST_CASE("file store: a flipped byte is reported as corrupt", "[coordinator][store]") {
  TempDir dir;
  auto store = FileStore::open(dir.path);
  REQUIRE(store.ok());
  REQUIRE((*store)->put(bytes_of("a state worth keeping")) == Status::kOk);
  std::string full = read_all((*store)->path());
  for (size_t i = 0; i < full.size(); ++i) {
    std::string bad = full;
    bad[i] = static_cast<char>(bad[i] ^ 0x20);
    write_all((*store)->path(), bad);
    CHECK((*store)->get().status() == Status::kCorrupt);
  }
}

TEST_CASE("file store: a data dir that is a file cannot be opened", "[coordinator][store]") {
  TempDir dir;
  write_all(dir.path + "/file", "x");
  CHECK(FileStore::open(dir.path + "/file").status() == Status::kIoError);
}
