// Replica files on a real filesystem, written with real io_uring and O_DIRECT.
#include "backup/replica_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "common/checksum.h"
#include "common/clock.h"
#include "common/log_entry.h"
#include "common/prefault.h"
#include "common/segment_iterator.h"
#include "test/backup/segment_image.h"
#include "test/temp_dir.h"

using namespace ramkv;
using namespace ramkv::backup;

namespace {

// On the real disk, not tmpfs: O_DIRECT.
struct TempDir : test::TempDir {
  TempDir() : test::TempDir("/var/tmp") {}
};

}  // namespace

TEST_CASE("replica file: a header survives encode and decode", "[backup][replica_file]") {
  ReplicaHeader h{.master_id = 1ULL << 40,
                  .segment_id = 99,
                  .epoch = 5,
                  .capacity = 8 << 20,
                  .certificate_bytes = 12345,
                  .certificate_checksum = 0xdeadbeef,
                  .closed = true};
  AlignedBuffer block(kReplicaHeaderBlock);
  encode_replica_header(h, block.span());
  auto back = decode_replica_header(block.span());
  REQUIRE(back.ok());
  CHECK(*back == h);
}

TEST_CASE("replica file: a flipped header byte is corruption, a wrong magic a format error",
          "[backup][replica_file]") {
  ReplicaHeader h{.master_id = 1, .segment_id = 2, .capacity = 4096};
  AlignedBuffer block(kReplicaHeaderBlock);
  for (size_t i = 4; i < 56; ++i) {
    encode_replica_header(h, block.span());
    block.data()[i] ^= std::byte{0x10};
    INFO("byte " << i);
    auto r = decode_replica_header(block.span());
    CHECK((r.status() == Status::kCorrupt || r.status() == Status::kFormatError));
  }
  encode_replica_header(h, block.span());
  block.data()[0] ^= std::byte{1};
  CHECK(decode_replica_header(block.span()).status() == Status::kFormatError);
  CHECK(decode_replica_header(block.span().first(10)).status() == Status::kFormatError);
}

TEST_CASE("replica file: a certificate longer than the capacity is refused",
          "[backup][replica_file]") {
  ReplicaHeader h{.master_id = 1, .segment_id = 2, .capacity = 4096, .certificate_bytes = 8192};
  AlignedBuffer block(kReplicaHeaderBlock);
  encode_replica_header(h, block.span());
  CHECK(decode_replica_header(block.span()).status() == Status::kFormatError);
}

TEST_CASE("replica file: a replica written with io_uring reads back and validates",
          "[backup][replica_file]") {
  TempDir dir;
  auto sample = test::make_segment(7, 50);
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  ReplicaHeader h = test::closed_header(sample, 42, 3);
  REQUIRE(write_replica(**ring, dir.path, h, sample.bytes, /*sync=*/true) == Status::kOk);
  std::string path = replica_path(dir.path, 42, 7);
  CHECK(path == dir.path + "/42/7");
  auto loaded = load_replica(path);
  REQUIRE(loaded.ok());
  CHECK(loaded->header == h);
  auto bytes = loaded->data.span().first(h.certificate_bytes);
  CHECK(std::memcmp(bytes.data(), sample.bytes.data(), bytes.size()) == 0);
  ramkv::SegmentIterator it(bytes, ramkv::Certificate{h.certificate_bytes, h.certificate_checksum});
  CHECK(it.validate() == Status::kOk);
  int objects = 0;
  for (; it.valid(); it.next()) ++objects;
  CHECK(objects == 50);
  CHECK(it.status() == Status::kOk);
}

TEST_CASE("replica file: a torn file (cut short after a crash) is detected",
          "[backup][replica_file]") {
  TempDir dir;
  auto sample = test::make_segment(7, 50);
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  ReplicaHeader h = test::closed_header(sample, 1, 3);
  REQUIRE(write_replica(**ring, dir.path, h, sample.bytes, false) == Status::kOk);
  std::string path = replica_path(dir.path, 1, 7);
  REQUIRE(::truncate(path.c_str(), static_cast<off_t>(kReplicaHeaderBlock + 100)) == 0);
  CHECK(load_replica(path).status() == Status::kFormatError);
  REQUIRE(::truncate(path.c_str(), 100) == 0);
  CHECK(load_replica(path).status() == Status::kFormatError);
  CHECK(load_replica(dir.path + "/1/8").status() == Status::kObjectNotFound);
}

TEST_CASE("replica file: a payload byte flipped on disk fails the certificate",
          "[backup][replica_file]") {
  TempDir dir;
  auto sample = test::make_segment(7, 50);
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  ReplicaHeader h = test::closed_header(sample, 1, 3);
  REQUIRE(write_replica(**ring, dir.path, h, sample.bytes, false) == Status::kOk);
  std::string path = replica_path(dir.path, 1, 7);
  int fd = ::open(path.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  char b = 0;
  off_t at = static_cast<off_t>(kReplicaHeaderBlock + sample.bytes.size() / 2);
  REQUIRE(::pread(fd, &b, 1, at) == 1);
  b = static_cast<char>(b ^ 0x01);
  REQUIRE(::pwrite(fd, &b, 1, at) == 1);
  ::close(fd);
  auto loaded = load_replica(path);
  REQUIRE(loaded.ok());  // the header is intact; the damage is in the segment bytes
  ramkv::SegmentIterator it(loaded->data.span().first(h.certificate_bytes),
                            ramkv::Certificate{h.certificate_bytes, h.certificate_checksum});
  CHECK(it.validate() != Status::kOk);
}

TEST_CASE("uring: many writes in flight complete once each and land at their offsets",
          "[backup][uring]") {
  TempDir dir;
  auto ring = Uring::create(16);
  REQUIRE(ring.ok());
  std::string path = dir.path + "/blocks";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_DIRECT, 0644);
  REQUIRE(fd >= 0);
  constexpr int kBlocks = 64;
  std::vector<AlignedBuffer> buffers;
  for (int i = 0; i < kBlocks; ++i) {
    buffers.emplace_back(kDirectAlignment);
    std::memset(buffers.back().data(), i, kDirectAlignment);
  }
  std::vector<int> completed(kBlocks, 0);
  std::vector<Uring::Completion> done;
  int next = 0;
  while (next < kBlocks || (*ring)->in_flight() > 0) {
    while (next < kBlocks && (*ring)->submit_write(fd, buffers[static_cast<size_t>(next)].span(),
                                                   static_cast<uint64_t>(next) * kDirectAlignment,
                                                   static_cast<uint64_t>(next)) == Status::kOk) {
      ++next;
    }
    done.clear();
    REQUIRE((*ring)->wait(1, &done) == Status::kOk);
    for (const auto& c : done) {
      CHECK(c.result == static_cast<int32_t>(kDirectAlignment));
      ++completed[static_cast<size_t>(c.user_data)];
    }
  }
  for (int n : completed) CHECK(n == 1);
  AlignedBuffer check(kDirectAlignment);
  for (int i = 0; i < kBlocks; i += 7) {
    REQUIRE(::pread(fd, check.data(), kDirectAlignment,
                    static_cast<off_t>(i) * static_cast<off_t>(kDirectAlignment)) ==
            static_cast<ssize_t>(kDirectAlignment));
    CHECK(check.data()[0] == static_cast<std::byte>(i));
    CHECK(check.data()[kDirectAlignment - 1] == static_cast<std::byte>(i));
  }
  ::close(fd);
}

TEST_CASE("uring: submitting past the depth answers retry instead of overflowing",
          "[backup][uring]") {
  TempDir dir;
  auto ring = Uring::create(2);
  REQUIRE(ring.ok());
  int fd = ::open((dir.path + "/f").c_str(), O_RDWR | O_CREAT, 0644);
  REQUIRE(fd >= 0);
  AlignedBuffer b(kDirectAlignment);
  CHECK((*ring)->submit_write(fd, b.span(), 0, 1) == Status::kOk);
  CHECK((*ring)->submit_write(fd, b.span(), 4096, 2) == Status::kOk);
  CHECK((*ring)->submit_write(fd, b.span(), 8192, 3) == Status::kRetry);
  std::vector<Uring::Completion> done;
  while (done.size() < 2) REQUIRE((*ring)->wait(1, &done) == Status::kOk);
  CHECK((*ring)->in_flight() == 0);
  ::close(fd);
}

namespace {

// The "THPeligible:" field of the mapping in /proc/self/smaps that holds `address`: 1
// when the kernel may back it with transparent huge pages. -1 if not found.
int huge_page_eligible(const void* address) {
  std::ifstream smaps("/proc/self/smaps");
  const auto at = reinterpret_cast<uintptr_t>(address);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    uintptr_t start = 0, end = 0;
    // A mapping's first line: "start-end perms offset dev inode [path]", in hex.
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " ", &start, &end) == 2 &&
        line.find(':') > line.find(' ')) {
      inside = start <= at && at < end;
      continue;
    }
    if (inside && line.rfind("THPeligible:", 0) == 0) {
      return std::atoi(line.c_str() + std::strlen("THPeligible:"));
    }
  }
  return -1;
}

}  // namespace

TEST_CASE("aligned buffer: a segment-sized one asks for huge pages and carries O_DIRECT I/O",
          "[backup][uring]") {
  const size_t bytes = kReplicaHeaderBlock + (size_t{8} << 20);
  AlignedBuffer out(bytes);
  REQUIRE(out.size() == bytes);
  CHECK(reinterpret_cast<uintptr_t>(out.data()) % kHugePageBytes == 0);
  CHECK(std::all_of(out.data(), out.data() + out.size(),
                    [](std::byte b) { return b == std::byte{0}; }));
  if (transparent_huge_pages_enabled()) {
    CHECK(huge_page_eligible(out.data()) == 1);
  } else {
    WARN("transparent huge pages are off here: the buffer uses 4 KiB pages");
  }
  // Small buffers stay as they were: block-aligned, not asking for anything.
  AlignedBuffer small(kReplicaHeaderBlock);
  CHECK(reinterpret_cast<uintptr_t>(small.data()) % kDirectAlignment == 0);

  for (size_t i = 0; i < bytes; i += 512) out.data()[i] = static_cast<std::byte>(i / 512 * 7);
  TempDir dir;
  std::string path = dir.path + "/segment";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_DIRECT, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(::pwrite(fd, out.data(), bytes, 0) == static_cast<ssize_t>(bytes));
  AlignedBuffer in(bytes);
  REQUIRE(::pread(fd, in.data(), bytes, 0) == static_cast<ssize_t>(bytes));
  ::close(fd);
  CHECK(std::memcmp(in.data(), out.data(), bytes) == 0);
}
