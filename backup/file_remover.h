// FileRemover: deletes files and directories on a thread of its own, in the order asked.
//
// Deleting a file waits for the filesystem: on the machines we measure on (ext4 without a
// journal, metadata written synchronously) an unlink takes about 8 ms, and a backup that
// drops the 132 replicas of a recovered master at once kept its dispatch thread from
// serving for over a second: its server missed the failure detector's pings and was
// suspected of having crashed. Only what no later operation of the caller can name again
// goes here as is (the files of a master that was removed: its id never comes back). A
// freed replica's path can be named again (its master makes a new replica of the same
// segment on this backup): whoever creates a file calls claim() first, which drops a
// queued removal of that path or waits for one under way, so no removal ever deletes a
// newer file. Paths are taken in order, so a directory named after its files is removed
// once they are.
//
// Owner: BackupService. Threads: remove() from any thread; the work on the remover's.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ramkv::backup {

class FileRemover {
 public:
  FileRemover();
  // Finishes what was asked, then stops.
  ~FileRemover();
  FileRemover(const FileRemover&) = delete;
  FileRemover& operator=(const FileRemover&) = delete;

  // Queues `files` (unlink; one already gone is fine), then `directory` if not empty
  // (removed once empty; one not empty is left, and said in the log).
  void remove(std::vector<std::string> files, std::string directory = {});
  // Takes `path` back before a new file is created there: a queued removal of it is
  // dropped; one under way is waited for (an unlink: milliseconds at most).
  void claim(const std::string& path);
  // Blocks until everything queued so far is done (tests).
  void drain();
  uint64_t removed() const;  // files unlinked so far
  uint64_t failed() const;   // files and directories that could not be removed

 private:
  struct Item {
    std::string path;
    bool directory = false;
  };
  void run();

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable idle_;
  std::deque<Item> queue_;
  bool busy_ = false;
  std::string current_;  // the path being removed while busy_
  bool stop_ = false;
  uint64_t removed_ = 0;
  uint64_t failed_ = 0;
  std::thread thread_;
};

}  // namespace ramkv::backup
