// A restarted backup's scan of its directory: good, torn and corrupt replicas, and
// names that are not replicas.
#include "backup/replica_scanner.h"

#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>

#include "common/checksum.h"
#include "test/backup/segment_image.h"
#include "test/temp_dir.h"

using namespace ramkv;
using namespace ramkv::backup;

namespace {

// Writes a closed replica of a segment holding `objects` entries; returns its bytes.
std::vector<std::byte> put_replica(Uring& ring, const std::string& dir, uint64_t master_id,
                                   uint64_t segment_id, int objects) {
  auto image = test::make_segment(segment_id, objects);
  REQUIRE(write_replica(ring, dir, test::closed_header(image, master_id), image.bytes, false) ==
          Status::kOk);
  return image.bytes;
}

}  // namespace

TEST_CASE("replica scanner: a missing directory is an empty backup", "[backup][scanner]") {
  auto r = scan_replicas("/nonexistent/ramkv/backup");
  REQUIRE(r.ok());
  CHECK(r->empty());
}

TEST_CASE("replica scanner: good, torn and corrupt replicas are each told apart",
          "[backup][scanner]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  auto good = put_replica(**ring, dir.path, 1, 10, 40);
  auto torn = put_replica(**ring, dir.path, 1, 11, 40);
  auto corrupt = put_replica(**ring, dir.path, 2, 12, 40);
  // kill -9 in the middle of a write: the file ends part-way through the segment.
  std::string torn_path = replica_path(dir.path, 1, 11);
  REQUIRE(::truncate(torn_path.c_str(),
                     static_cast<off_t>(kReplicaHeaderBlock + torn.size() / 2)) == 0);
  // A bit flipped on disk in the last entry.
  std::string corrupt_path = replica_path(dir.path, 2, 12);
  int fd = ::open(corrupt_path.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  off_t at = static_cast<off_t>(kReplicaHeaderBlock + corrupt.size() - 3);
  char b = 0;
  REQUIRE(::pread(fd, &b, 1, at) == 1);
  b = static_cast<char>(b ^ 0x40);
  REQUIRE(::pwrite(fd, &b, 1, at) == 1);
  ::close(fd);
  // Things that are not replicas are left alone.
  std::ofstream(dir.path + "/README") << "not a master";
  std::ofstream(dir.path + "/1/notes.txt") << "not a segment";

  auto scanned = scan_replicas(dir.path);
  REQUIRE(scanned.ok());
  REQUIRE(scanned->size() == 3);
  const auto& g = (*scanned)[0];
  const auto& t = (*scanned)[1];
  const auto& c = (*scanned)[2];
  CHECK(g.master_id == 1);
  CHECK(g.segment_id == 10);
  CHECK(g.status == Status::kOk);
  CHECK(g.valid_bytes == good.size());
  CHECK(t.segment_id == 11);
  CHECK(t.status == Status::kFormatError);  // torn
  CHECK(t.valid_bytes > 0);
  CHECK(t.valid_bytes <= torn.size() / 2);
  CHECK(c.master_id == 2);
  CHECK(c.status == Status::kCorrupt);
  CHECK(c.valid_bytes < corrupt.size());
  CHECK(c.valid_bytes > corrupt.size() / 2);  // everything before the damaged entry
  CHECK(std::filesystem::exists(dir.path + "/1/notes.txt"));
}

TEST_CASE("replica scanner: a file that claims to be another replica is corrupt",
          "[backup][scanner]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  put_replica(**ring, dir.path, 3, 30, 5);
  std::filesystem::rename(replica_path(dir.path, 3, 30), replica_path(dir.path, 3, 31));
  auto scanned = scan_replicas(dir.path);
  REQUIRE(scanned.ok());
  REQUIRE(scanned->size() == 1);
  CHECK((*scanned)[0].segment_id == 31);
  CHECK((*scanned)[0].status == Status::kCorrupt);
}
