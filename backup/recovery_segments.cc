#include "backup/recovery_segments.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <utility>

#include "backup/replica_file.h"
#include "backup/uring.h"
#include "common/certificate.h"
#include "common/checksum.h"
#include "common/clock.h"
#include "common/log.h"
#include "common/log_entry.h"
#include "common/segment_iterator.h"

namespace ramkv::backup {
namespace {

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

// The first read of a head: metadata entries are a few KiB unless the digest or the table
// statistics are long; the window grows until they fit.
constexpr uint32_t kHeadWindowBytes = 64 * 1024;

// user_data of a read: replica index in the high bits, file offset in the low ones.
constexpr unsigned kOffsetBits = 40;
constexpr uint64_t kOffsetMask = (uint64_t{1} << kOffsetBits) - 1;

// Closes a file descriptor on every path out.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& other) noexcept : fd(std::exchange(other.fd, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd = std::exchange(other.fd, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  void reset() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

bool preads(int fd, std::byte* out, size_t bytes, uint64_t offset, size_t* got) {
  *got = 0;
  while (*got < bytes) {
    ssize_t n = ::pread(fd, out + *got, bytes - *got, static_cast<off_t>(offset + *got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (n == 0) break;
    *got += static_cast<size_t>(n);
  }
  return true;
}

// A run of consecutive entries of one partition in a replica's segment bytes.
struct Range {
  uint32_t offset = 0;
  uint32_t bytes = 0;
};

// One partition's entries in one replica.
struct PartitionEntries {
  std::vector<Range> ranges;  // in log order
  uint32_t entry_bytes = 0;
  uint32_t entry_count = 0;
};

// What the first entries of a head say (docs/log-format.md: segment header, digest, safe
// version, table stats, then objects).
struct HeadInfo {
  bool has_digest = false;
  std::vector<uint64_t> digest;
  uint64_t safe_version = 0;
  std::vector<TableStat> stats;
};

}  // namespace

// A replica's bytes: its RAM source's, or a buffer its file was read into. A pooled
// buffer goes back to the pool when the last owner (the replica, or a reply of its
// entries that a socket has not taken yet) lets go; any other is freed.
struct RecoverySegments::Bytes {
  std::vector<std::byte> ram;
  AlignedBuffer file;
  std::shared_ptr<BufferPool> pool;  // where `file` goes back to; null: none
  ~Bytes() {
    if (pool != nullptr && file.size() != 0) pool->give(std::move(file));
  }
};

struct RecoverySegments::Replica {
  enum class State : uint8_t { kUnread, kChecked, kSplit, kFailed };

  // Set by the constructor. entry.status is guarded by mutex_ (fail() changes it); the
  // rest never changes.
  wire::ReplicaEntry entry;
  uint32_t certificate_checksum = 0;
  std::string path;
  // The bytes (RAM source, or the file's header block and segment bytes as read), and
  // the certified segment bytes within them. Written by the constructor or the thread
  // while state is kUnread; never changed afterwards (invariant 2). Shared with the
  // replies that send them (get_pieces' keep), which may outlive this object.
  std::shared_ptr<Bytes> bytes;
  std::span<const std::byte> segment;
  bool counted = false;  // the thread's: RAM bytes added to bytes_read_

  // Guarded by mutex_.
  State state = State::kUnread;
  bool admitted = false;                     // queued for the thread (invariant 5)
  Status failure = Status::kOk;              // with kFailed: what get_pieces answers
  std::vector<PartitionEntries> partitions;  // with kSplit: by PartitionMap index

  Certificate certificate() const { return {entry.certificate_bytes, certificate_checksum}; }
};

// The partition map, checked and sorted for lookups.
struct RecoverySegments::PartitionMap {
  std::vector<wire::PartitionTablet> tablets;  // by (table_id, start_hash); pads zeroed
  std::vector<uint32_t> tablet_index;          // tablets[i]'s partition: index into ids
  std::vector<uint32_t> ids;                   // partition ids, sorted, distinct

  static Result<PartitionMap> make(std::span<const wire::PartitionTablet> in) {
    PartitionMap m;
    m.tablets.reserve(in.size());
    for (const auto& t : in) {
      if (t.end_hash < t.start_hash) return Status::kBadRequest;
      m.tablets.push_back({.table_id = t.table_id,
                           .start_hash = t.start_hash,
                           .end_hash = t.end_hash,
                           .partition_id = t.partition_id});
    }
    std::sort(m.tablets.begin(), m.tablets.end(), [](const auto& a, const auto& b) {
      return std::pair{a.table_id, a.start_hash} < std::pair{b.table_id, b.start_hash};
    });
    for (size_t i = 1; i < m.tablets.size(); ++i) {
      const auto& prev = m.tablets[i - 1];
      if (prev.table_id == m.tablets[i].table_id && m.tablets[i].start_hash <= prev.end_hash) {
        return Status::kBadRequest;  // overlapping ranges (or the same range twice)
      }
    }
    for (const auto& t : m.tablets) m.ids.push_back(t.partition_id);
    std::sort(m.ids.begin(), m.ids.end());
    m.ids.erase(std::unique(m.ids.begin(), m.ids.end()), m.ids.end());
    for (const auto& t : m.tablets) m.tablet_index.push_back(*index_of(m.ids, t.partition_id));
    return m;
  }

  static std::optional<uint32_t> index_of(const std::vector<uint32_t>& ids, uint32_t id) {
    auto it = std::lower_bound(ids.begin(), ids.end(), id);
    if (it == ids.end() || *it != id) return std::nullopt;
    return static_cast<uint32_t>(it - ids.begin());
  }
  std::optional<uint32_t> index_of(uint32_t partition_id) const {
    return index_of(ids, partition_id);
  }

  // The partition index of the tablet holding (table, hash), if any.
  std::optional<uint32_t> find(uint64_t table_id, uint64_t hash) const {
    auto it = std::upper_bound(tablets.begin(), tablets.end(), std::pair{table_id, hash},
                               [](const std::pair<uint64_t, uint64_t>& key, const auto& t) {
                                 return key < std::pair{t.table_id, t.start_hash};
                               });
    if (it == tablets.begin()) return std::nullopt;
    --it;
    if (it->table_id != table_id || hash > it->end_hash) return std::nullopt;
    return tablet_index[static_cast<size_t>(it - tablets.begin())];
  }

  // Checks `segment` against `cert` and splits its object and tombstone entries by
  // partition, in one pass. kCorrupt when anything does not check out.
  Status split(std::span<const std::byte> segment, Certificate cert,
               std::vector<PartitionEntries>* out) const;

  bool same_as(const PartitionMap& other) const {
    return std::equal(tablets.begin(), tablets.end(), other.tablets.begin(), other.tablets.end(),
                      [](const auto& a, const auto& b) {
                        return a.table_id == b.table_id && a.start_hash == b.start_hash &&
                               a.end_hash == b.end_hash && a.partition_id == b.partition_id;
                      });
  }
};

// Reads the replica files on the object's thread: io_uring with up to kRingDepth reads of
// kReadChunkBytes in flight over several files, or pread where io_uring is unavailable.
// A file's buffer belongs to its Replica, which outlives the Reader (invariant 2).
class RecoverySegments::Reader {
 public:
  explicit Reader(RecoverySegments& owner) : owner_(owner) {
    auto ring = Uring::create(kRingDepth);
    if (ring.ok()) {
      ring_ = std::move(*ring);
    } else {
      LOG_WARNING("recovery {}: no io_uring; replicas are read with pread", owner_.recovery_id_);
    }
  }
  ~Reader() {
    // The kernel writes into replicas' buffers until the reads complete.
    while (ring_usable() && ring_->in_flight() > 0) {
      done_.clear();
      if (ring_->wait(1, &done_) != Status::kOk) break;
    }
  }
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  bool busy() const { return !files_.empty(); }

  // Queues reads of the files in *to_read while the ring has room (without io_uring: reads
  // one file whole, into *to_check). Files that cannot be opened are failed at once.
  void fill(std::deque<size_t>* to_read, std::deque<size_t>* to_check) {
    if (!ring_usable()) {
      if (!to_read->empty()) {
        size_t index = to_read->front();
        to_read->pop_front();
        read_sync(index, to_check);
      }
      return;
    }
    while (ring_->room() > 0) {
      if (filling_) {
        File& f = files_.at(*filling_);
        if (f.failure == Status::kOk) queue_read(*filling_, f, f.next_offset);
        f.next_offset = f.failure == Status::kOk ? chunk_end(f, f.next_offset) : f.end;
        if (f.next_offset >= f.end) filling_.reset();
        continue;
      }
      if (to_read->empty()) break;
      size_t index = to_read->front();
      to_read->pop_front();
      File f;
      if (open(index, /*direct=*/true, &f)) {
        files_.emplace(index, std::move(f));
        filling_ = index;
      }
    }
  }

  // Submits what fill() queued and handles completions: at least one when `block` and a
  // read is in flight. Files read in full go to *to_check.
  void pump(bool block, std::deque<size_t>* to_check) {
    if (!ring_usable()) return;
    done_.clear();
    if (ring_->wait(block ? 1 : 0, &done_) != Status::kOk) {
      // The ring itself failed (logged): the files being read fail, the rest are read
      // with pread. Their buffers live on with their replicas, so late reads are harmless.
      ring_failed_ = true;
      for (auto& [index, f] : files_) {
        f.failure = Status::kIoError;
        f.in_flight = 0;
      }
      filling_.reset();
    }
    for (const auto& c : done_) complete(c);
    for (auto it = files_.begin(); it != files_.end();) {
      File& f = it->second;
      if (f.in_flight == 0 && (f.next_offset >= f.end || f.failure != Status::kOk)) {
        if (filling_ == it->first) filling_.reset();
        finish(it->first, f, to_check);
        it = files_.erase(it);
      } else {
        ++it;
      }
    }
  }

 private:
  struct File {
    Fd fd;
    uint64_t needed = 0;       // header block + certified bytes
    uint64_t end = 0;          // bytes to read: needed, rounded up to a block
    uint64_t next_offset = 0;  // first byte not yet queued
    uint64_t bytes_read = 0;
    uint32_t in_flight = 0;
    Status failure = Status::kOk;  // kIoError, or kFormatError (torn: the file shrank)
    uint64_t start_ns = 0;
  };

  bool ring_usable() const { return ring_ != nullptr && !ring_failed_; }

  static uint64_t chunk_end(const File& f, uint64_t offset) {
    return std::min(f.end, (offset / kReadChunkBytes + 1) * kReadChunkBytes);
  }

  // Opens replica `index`'s file and allocates its buffer; false (the replica failed) if
  // the file cannot be opened or is shorter than its certificate.
  bool open(size_t index, bool direct, File* f) {
    Replica& r = *owner_.replicas_[index];
    int flags = O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0);
    f->fd = Fd(::open(r.path.c_str(), flags));
    if (f->fd.fd < 0 && direct && errno == EINVAL) {
      f->fd = Fd(::open(r.path.c_str(), O_RDONLY | O_CLOEXEC));  // tmpfs: no O_DIRECT
    }
    if (f->fd.fd < 0) {
      LOG_WARNING("recovery {}: cannot open {}: {}", owner_.recovery_id_, r.path,
                  std::strerror(errno));
      owner_.fail(index, Status::kIoError, wire::kReplicaCorrupt);
      return false;
    }
    struct stat st {};
    if (::fstat(f->fd.fd, &st) != 0) {
      owner_.fail(index, Status::kIoError, wire::kReplicaCorrupt);
      return false;
    }
    f->needed = kReplicaHeaderBlock + uint64_t{r.entry.certificate_bytes};
    if (static_cast<uint64_t>(st.st_size) < f->needed) {
      owner_.fail(index, Status::kCorrupt, wire::kReplicaTorn);  // the certificate outran it
      return false;
    }
    f->end = align_up(f->needed);
    // The backup's pool first: its buffers' pages were touched before (buffer_pool.h).
    if (owner_.pool_ != nullptr && owner_.pool_->buffer_bytes() >= f->end) {
      r.bytes->file = owner_.pool_->take_or_allocate();
    } else {
      r.bytes->file = AlignedBuffer(f->end);
    }
    f->start_ns = now_ns();
    return true;
  }

  // Queues the read of [offset, the end of its chunk) of replica `index`'s file. The
  // caller has checked room().
  void queue_read(size_t index, File& f, uint64_t offset) {
    std::span<std::byte> into(owner_.replicas_[index]->bytes->file.data() + offset,
                              chunk_end(f, offset) - offset);
    RAMKV_CHECK(offset <= kOffsetMask);
    Status s = ring_->submit_read(f.fd.fd, into, offset, (uint64_t{index} << kOffsetBits) | offset);
    RAMKV_CHECK(s == Status::kOk);
    ++f.in_flight;
  }

  void complete(const Uring::Completion& c) {
    size_t index = static_cast<size_t>(c.user_data >> kOffsetBits);
    uint64_t offset = c.user_data & kOffsetMask;
    auto it = files_.find(index);
    if (it == files_.end()) return;  // a late read after the ring failed
    File& f = it->second;
    --f.in_flight;
    if (c.result < 0) {
      LOG_WARNING("recovery {}: reading {}: {}", owner_.recovery_id_, owner_.replicas_[index]->path,
                  std::strerror(-c.result));
      f.failure = Status::kIoError;
      return;
    }
    f.bytes_read += static_cast<uint64_t>(c.result);
    uint64_t got_to = offset + static_cast<uint64_t>(c.result);
    if (got_to >= chunk_end(f, offset) || got_to >= f.needed) return;
    if (c.result == 0) {
      f.failure = Status::kFormatError;  // the file shrank since fstat
    } else if (f.failure == Status::kOk) {
      queue_read(index, f, got_to);  // short: this completion made room for the rest
    }
  }

  // The file is read (or failed): checks its header and hands it to the checker.
  void finish(size_t index, File& f, std::deque<size_t>* to_check) {
    f.fd.reset();
    owner_.note_read(f.bytes_read, f.start_ns, now_ns());
    if (f.failure != Status::kOk) {
      bool torn = f.failure == Status::kFormatError;
      owner_.fail(index, torn ? Status::kCorrupt : Status::kIoError,
                  torn ? wire::kReplicaTorn : wire::kReplicaCorrupt);
      return;
    }
    Replica& r = *owner_.replicas_[index];
    auto header =
        decode_replica_header({r.bytes->file.data(), static_cast<size_t>(kReplicaHeaderBlock)});
    if (!header.ok() || header->master_id != r.entry.master_id ||
        header->segment_id != r.entry.segment_id) {
      bool torn = header.status() == Status::kFormatError;
      owner_.fail(index, Status::kCorrupt, torn ? wire::kReplicaTorn : wire::kReplicaCorrupt);
      return;
    }
    r.segment = {r.bytes->file.data() + kReplicaHeaderBlock, r.entry.certificate_bytes};
    to_check->push_back(index);
  }

  void read_sync(size_t index, std::deque<size_t>* to_check) {
    File f;
    if (!open(index, /*direct=*/false, &f)) return;
    size_t got = 0;
    if (!preads(f.fd.fd, owner_.replicas_[index]->bytes->file.data(), f.needed, 0, &got)) {
      f.failure = Status::kIoError;
    } else if (got < f.needed) {
      f.failure = Status::kFormatError;
    }
    f.bytes_read = got;
    finish(index, f, to_check);
  }

  RecoverySegments& owner_;
  std::map<size_t, File> files_;   // being read, by replica index
  std::optional<size_t> filling_;  // the file whose reads are not all queued yet
  std::vector<Uring::Completion> done_;
  // After files_: destroyed first (~Reader has drained it), while their fds are open.
  std::unique_ptr<Uring> ring_;
  bool ring_failed_ = false;
};

RecoverySegments::RecoverySegments(uint64_t master_id, uint64_t recovery_id,
                                   std::vector<RecoverySource> sources, bool defer_reads,
                                   std::shared_ptr<BufferPool> pool)
    : master_id_(master_id),
      recovery_id_(recovery_id),
      defer_reads_(defer_reads),
      pool_(std::move(pool)) {
  std::sort(sources.begin(), sources.end(),
            [](const auto& a, const auto& b) { return a.entry.segment_id < b.entry.segment_id; });
  RAMKV_CHECK(sources.size() < (size_t{1} << (64 - kOffsetBits)));
  for (auto& s : sources) {
    RAMKV_CHECK_MSG(s.entry.master_id == master_id, "a replica of another master");
    RAMKV_CHECK_MSG(replicas_.empty() || replicas_.back()->entry.segment_id != s.entry.segment_id,
                    "two replicas of one segment");
    auto r = std::make_unique<Replica>();
    r->entry = s.entry;
    r->certificate_checksum = s.certificate_checksum;
    r->path = std::move(s.path);
    r->bytes = std::make_shared<Bytes>();
    r->bytes->pool = pool_;
    r->bytes->ram = std::move(s.bytes);
    const bool in_buffer = s.buffer.size() != 0;
    if (in_buffer) r->bytes->file = std::move(s.buffer);
    if (r->entry.status != wire::kReplicaOk) {
      r->state = Replica::State::kFailed;  // the scan found it torn or corrupt
      r->failure = Status::kCorrupt;
    } else if (r->path.empty()) {
      const std::span<const std::byte> held =
          in_buffer ? std::span<const std::byte>(r->bytes->file.data(), r->bytes->file.size())
                    : std::span<const std::byte>(r->bytes->ram);
      if (held.size() < r->entry.certificate_bytes) {
        r->state = Replica::State::kFailed;
        r->failure = Status::kCorrupt;
        r->entry.status = wire::kReplicaTorn;
      } else {
        r->segment = held.first(r->entry.certificate_bytes);
      }
    }
    replicas_.push_back(std::move(r));
  }
  read_digest();
  if (!defer_reads_) {
    for (size_t i = 0; i < replicas_.size(); ++i) admit_locked(i, /*urgent=*/false);
  }
  thread_ = std::thread([this] { run(); });
}

RecoverySegments::~RecoverySegments() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
  // The replicas' buffers go back to the pool as their Bytes are let go: now, or when
  // the last reply holding them is sent.
}

namespace {

// Parses the metadata at the start of `head` (the first bytes of a certified prefix of
// `certified_bytes`). kOk with the metadata once an object or tombstone, or the end of the
// prefix, is reached; kRetry when `head` ends first; kCorrupt for a bad entry.
Status parse_head(std::span<const std::byte> head, uint32_t certified_bytes, HeadInfo* info) {
  SegmentIterator it(head);
  for (; it.valid(); it.next()) {
    switch (it.type()) {
      case EntryType::kObject:
      case EntryType::kTombstone:
      case EntryType::kRpcResult:
        return Status::kOk;
      case EntryType::kLogDigest: {
        auto d = decode_log_digest(it.payload());
        if (!d.ok()) return Status::kCorrupt;
        info->digest = std::move(*d);
        info->has_digest = true;
        break;
      }
      case EntryType::kSafeVersion: {
        auto v = decode_safe_version(it.payload());
        if (!v.ok()) return Status::kCorrupt;
        info->safe_version = *v;
        break;
      }
      case EntryType::kTableStats: {
        auto s = decode_table_stats(it.payload());
        if (!s.ok()) return Status::kCorrupt;
        info->stats = std::move(*s);
        break;
      }
      default:
        break;
    }
  }
  if (it.valid_bytes() == certified_bytes) return Status::kOk;
  // Stopped inside the certified prefix: the window ended mid-entry, or a bad entry.
  return head.size() < certified_bytes ? Status::kRetry : Status::kCorrupt;
}

}  // namespace

void RecoverySegments::read_digest() {
  for (size_t i = replicas_.size(); i-- > 0;) {
    Replica& r = *replicas_[i];
    if (r.state == Replica::State::kFailed) continue;
    const uint32_t certified = r.entry.certificate_bytes;
    HeadInfo head;
    Status s = Status::kRetry;
    if (r.path.empty()) {
      s = parse_head(r.segment, certified, &head);
    } else {
      Fd fd(::open(r.path.c_str(), O_RDONLY | O_CLOEXEC));
      std::vector<std::byte> block(kReplicaHeaderBlock);
      size_t got = 0;
      if (fd.fd < 0 || !preads(fd.fd, block.data(), block.size(), 0, &got)) {
        fail(i, Status::kIoError, wire::kReplicaCorrupt);
        continue;
      }
      auto header = decode_replica_header(std::span(block).first(got));
      if (!header.ok() || header->segment_id != r.entry.segment_id ||
          header->master_id != r.entry.master_id) {
        bool torn = header.status() == Status::kFormatError;
        fail(i, Status::kCorrupt, torn ? wire::kReplicaTorn : wire::kReplicaCorrupt);
        continue;
      }
      for (uint64_t window = std::min(certified, kHeadWindowBytes); s == Status::kRetry;
           window = std::min<uint64_t>(certified, window * 4)) {
        std::vector<std::byte> bytes(window);
        if (!preads(fd.fd, bytes.data(), window, kReplicaHeaderBlock, &got)) {
          s = Status::kIoError;
          break;
        }
        if (got < window) {
          s = Status::kFormatError;  // shorter than the certificate: torn
          break;
        }
        head = HeadInfo{};
        s = parse_head(bytes, certified, &head);
      }
    }
    if (s != Status::kOk) {
      fail(i, s == Status::kIoError ? Status::kIoError : Status::kCorrupt,
           s == Status::kFormatError ? wire::kReplicaTorn : wire::kReplicaCorrupt);
      continue;
    }
    if (!head.has_digest) continue;
    digest_header_.digest_segment_id = r.entry.segment_id;
    digest_header_.digest_epoch = r.entry.epoch;
    digest_header_.digest_closed = r.entry.closed;
    digest_header_.safe_version = head.safe_version;
    digest_header_.digest_count = static_cast<uint32_t>(head.digest.size());
    digest_header_.table_stat_count = static_cast<uint32_t>(head.stats.size());
    digest_ = std::move(head.digest);
    for (const auto& t : head.stats) {
      table_stats_.push_back(
          {.table_id = t.table_id, .object_count = t.object_count, .object_bytes = t.object_bytes});
    }
    return;
  }
}

void RecoverySegments::fail(size_t index, Status why, uint8_t listed_as) {
  std::lock_guard lock(mutex_);
  Replica& r = *replicas_[index];
  LOG_WARNING("recovery {}: replica of segment {} of master {} is unusable ({}): never served",
              recovery_id_, r.entry.segment_id, master_id_, status_name(why));
  r.state = Replica::State::kFailed;
  r.failure = why;
  r.entry.status = listed_as;
  r.partitions.clear();
}

void RecoverySegments::note_read(uint64_t bytes, uint64_t start_ns, uint64_t end_ns) {
  std::lock_guard lock(mutex_);
  bytes_read_ += bytes;
  if (first_read_start_ns_ == 0 || start_ns < first_read_start_ns_) first_read_start_ns_ = start_ns;
  last_read_end_ns_ = std::max(last_read_end_ns_, end_ns);
}

std::vector<std::byte> RecoverySegments::start_response() const {
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  std::lock_guard lock(mutex_);
  wire::StartReadingDataResponse header = digest_header_;
  header.replica_count = static_cast<uint32_t>(replicas_.size());
  w.put(header);
  for (const auto& r : replicas_) w.put(r->entry);
  for (uint64_t id : digest_) w.put(id);
  for (const auto& t : table_stats_) w.put(t);
  return body;
}

Status RecoverySegments::start_partitioning(std::span<const wire::PartitionTablet> map,
                                            std::optional<std::span<const uint64_t>> primaries) {
  auto made = PartitionMap::make(map);
  if (!made.ok()) return made.status();
  {
    std::lock_guard lock(mutex_);
    if (map_ != nullptr && !map_->same_as(*made)) return Status::kBadRequest;
    if (map_ == nullptr) map_ = std::make_shared<const PartitionMap>(std::move(*made));
    if (defer_reads_ && !primaries) {
      for (size_t i = 0; i < replicas_.size(); ++i) admit_locked(i, /*urgent=*/false);
    } else if (defer_reads_) {
      std::vector<size_t> named;
      for (uint64_t segment_id : *primaries) {
        if (auto index = find(segment_id)) named.push_back(*index);
      }
      std::sort(named.begin(), named.end());  // segment order: as recovery masters ask
      for (size_t index : named) admit_locked(index, /*urgent=*/false);
      LOG_INFO(
          "recovery {} of master {}: reading our {} primary replicas of {} held (the "
          "others only if asked for)",
          recovery_id_, wire::server_id_text(master_id_), named.size(), replicas_.size());
    }
  }
  wake_.notify_all();
  return Status::kOk;
}

void RecoverySegments::admit_locked(size_t index, bool urgent) const {
  Replica& r = *replicas_[index];
  if (r.admitted || r.state != Replica::State::kUnread) return;
  r.admitted = true;
  if (urgent) {
    admitted_.emplace_front(index, true);
  } else {
    admitted_.emplace_back(index, false);
  }
}

std::optional<size_t> RecoverySegments::find(uint64_t segment_id) const {
  auto it = std::lower_bound(
      replicas_.begin(), replicas_.end(), segment_id,
      [](const std::unique_ptr<Replica>& r, uint64_t id) { return r->entry.segment_id < id; });
  if (it == replicas_.end() || (*it)->entry.segment_id != segment_id) return std::nullopt;
  return static_cast<size_t>(it - replicas_.begin());
}

Status RecoverySegments::get_pieces(uint64_t segment_id, uint32_t partition_id,
                                    wire::RecoveryDataResponse* head,
                                    std::vector<std::span<const std::byte>>* pieces,
                                    std::shared_ptr<const void>* keep) const {
  std::unique_lock lock(mutex_);
  const auto at = find(segment_id);
  if (!at) return Status::kBadRequest;
  const Replica* r = replicas_[*at].get();
  if (r->state == Replica::State::kFailed) return r->failure;
  if (map_ == nullptr) return Status::kRetry;
  auto index = map_->index_of(partition_id);
  if (!index) return Status::kBadRequest;
  if (r->state == Replica::State::kUnread && !r->admitted) {
    // A secondary: its primary's backup failed the recovery master, which waits for it.
    LOG_INFO("recovery {}: segment {} of master {} asked for: reading our secondary replica",
             recovery_id_, segment_id, wire::server_id_text(master_id_));
    admit_locked(*at, /*urgent=*/true);
    lock.unlock();
    wake_.notify_all();
    return Status::kRetry;
  }
  if (r->state != Replica::State::kSplit) return Status::kRetry;
  const PartitionEntries& p = r->partitions[*index];
  *head = wire::RecoveryDataResponse{.epoch = r->entry.epoch,
                                     .entry_bytes = p.entry_bytes,
                                     .entry_count = p.entry_count,
                                     .closed = r->entry.closed};
  pieces->clear();
  pieces->reserve(p.ranges.size());
  for (const Range& range : p.ranges)
    pieces->push_back(r->segment.subspan(range.offset, range.bytes));
  if (keep != nullptr) *keep = r->bytes;
  return Status::kOk;
}

uint64_t RecoverySegments::bytes_read() const {
  std::lock_guard lock(mutex_);
  return bytes_read_;
}

uint64_t RecoverySegments::read_ns() const {
  std::lock_guard lock(mutex_);
  return last_read_end_ns_ > first_read_start_ns_ ? last_read_end_ns_ - first_read_start_ns_ : 0;
}

size_t RecoverySegments::replicas_pending() const {
  std::lock_guard lock(mutex_);
  size_t pending = 0;
  for (const auto& r : replicas_) {
    if (!r->admitted) continue;
    if (r->state == Replica::State::kUnread ||
        (r->state == Replica::State::kChecked && map_ != nullptr)) {
      ++pending;
    }
  }
  return pending;
}

size_t RecoverySegments::replicas_admitted() const {
  std::lock_guard lock(mutex_);
  return static_cast<size_t>(
      std::count_if(replicas_.begin(), replicas_.end(), [](const auto& r) { return r->admitted; }));
}

void RecoverySegments::run() {
  Reader reader(*this);
  std::deque<size_t> to_read;   // files not yet opened
  std::deque<size_t> to_check;  // bytes at hand, to check (and split, once the map is here)
  std::vector<size_t> unsplit;  // checked before the map arrived
  std::shared_ptr<const PartitionMap> map;
  // A burst of work (from the first replica taken to the queues running dry), for the log:
  // where a recovery's time goes (docs/recovery.md).
  uint64_t burst_start_ns = 0;
  uint64_t burst_start_cpu_ns = 0;
  size_t burst_replicas = 0;
  for (;;) {
    if (burst_replicas > 0 && to_read.empty() && to_check.empty() && !reader.busy()) {
      LOG_INFO(
          "recovery {} of master {}: {} replicas read, checked{} in {:.3f} s ({:.3f} s of CPU)",
          recovery_id_, wire::server_id_text(master_id_), burst_replicas, map ? " and split" : "",
          static_cast<double>(now_ns() - burst_start_ns) / 1e9,
          static_cast<double>(thread_cpu_ns() - burst_start_cpu_ns) / 1e9);
      burst_replicas = 0;
    }
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] {
        return stop_ || !to_read.empty() || !to_check.empty() || reader.busy() ||
               !admitted_.empty() || (map == nullptr && map_ != nullptr);
      });
      if (stop_) break;
      if (map == nullptr && map_ != nullptr) {
        map = map_;
        to_check.insert(to_check.end(), unsplit.begin(), unsplit.end());
        unsplit.clear();
      }
      // Newly admitted replicas: asked-for secondaries go first (a recovery master waits).
      for (const auto& [index, urgent] : admitted_) {
        if (burst_replicas++ == 0) {
          burst_start_ns = now_ns();
          burst_start_cpu_ns = thread_cpu_ns();
        }
        auto& queue = replicas_[index]->path.empty() ? to_check : to_read;
        if (urgent) {
          queue.push_front(index);
        } else {
          queue.push_back(index);
        }
      }
      admitted_.clear();
    }
    // Disk reads first, so that the disk works while this thread checks what it has.
    reader.fill(&to_read, &to_check);
    reader.pump(/*block=*/to_check.empty(), &to_check);
    if (to_check.empty()) continue;
    size_t index = to_check.front();
    to_check.pop_front();
    Replica& r = *replicas_[index];
    {
      std::lock_guard lock(mutex_);
      if (r.state == Replica::State::kFailed) continue;
    }
    const uint64_t start_ns = now_ns();
    std::vector<PartitionEntries> partitions;
    Status s = map == nullptr ? SegmentIterator(r.segment, r.certificate()).validate()
                              : map->split(r.segment, r.certificate(), &partitions);
    if (!r.counted && r.path.empty()) {
      r.counted = true;
      note_read(r.segment.size(), start_ns, now_ns());
    }
    if (s != Status::kOk) {
      fail(index, Status::kCorrupt, wire::kReplicaCorrupt);
      continue;
    }
    std::lock_guard lock(mutex_);
    if (map == nullptr) {
      r.state = Replica::State::kChecked;
      unsplit.push_back(index);
    } else {
      r.state = Replica::State::kSplit;
      r.partitions = std::move(partitions);
    }
  }
}

Status RecoverySegments::PartitionMap::split(std::span<const std::byte> segment, Certificate cert,
                                             std::vector<PartitionEntries>* out) const {
  out->assign(ids.size(), PartitionEntries{});
  SegmentIterator it(segment, cert);
  for (; it.valid(); it.next()) {
    uint64_t table_id = 0;
    std::string_view key;
    uint64_t hash = 0;
    bool have_hash = false;
    if (it.type() == EntryType::kObject) {
      auto o = decode_object(it.payload());
      if (!o.ok()) return Status::kCorrupt;
      table_id = o->table_id;
      key = o->key;
    } else if (it.type() == EntryType::kTombstone) {
      auto t = decode_tombstone(it.payload());
      if (!t.ok()) return Status::kCorrupt;
      table_id = t->table_id;
      key = t->key;
    } else if (it.type() == EntryType::kRpcResult) {
      // A completion record goes with the key it is about (docs/rpc.md, "Exactly once").
      auto r = decode_rpc_result(it.payload());
      if (!r.ok()) return Status::kCorrupt;
      table_id = r->table_id;
      hash = r->key_hash;
      have_hash = true;
    } else {
      continue;
    }
    auto index = find(table_id, have_hash ? hash : key_hash(table_id, key));
    if (!index) continue;
    PartitionEntries& p = (*out)[*index];
    const uint32_t bytes = it.header().total_bytes();
    if (!p.ranges.empty() && p.ranges.back().offset + p.ranges.back().bytes == it.offset()) {
      p.ranges.back().bytes += bytes;
    } else {
      p.ranges.push_back({it.offset(), bytes});
    }
    p.entry_bytes += bytes;
    ++p.entry_count;
  }
  if (it.status() != Status::kOk) return Status::kCorrupt;
  for (auto& p : *out) p.ranges.shrink_to_fit();
  return Status::kOk;
}

}  // namespace ramkv::backup
