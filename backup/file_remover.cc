#include "backup/file_remover.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/log.h"

namespace ramkv::backup {

FileRemover::FileRemover() : thread_([this] { run(); }) {}

FileRemover::~FileRemover() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void FileRemover::remove(std::vector<std::string> files, std::string directory) {
  if (files.empty() && directory.empty()) return;
  {
    std::lock_guard lock(mutex_);
    for (auto& f : files) queue_.push_back({.path = std::move(f), .directory = false});
    if (!directory.empty()) queue_.push_back({.path = std::move(directory), .directory = true});
  }
  wake_.notify_one();
}

void FileRemover::claim(const std::string& path) {
  std::unique_lock lock(mutex_);
  std::erase_if(queue_, [&](const Item& item) { return !item.directory && item.path == path; });
  idle_.wait(lock, [&] { return !busy_ || current_ != path; });
  if (queue_.empty() && !busy_) idle_.notify_all();
}

void FileRemover::drain() {
  std::unique_lock lock(mutex_);
  idle_.wait(lock, [this] { return queue_.empty() && !busy_; });
}

uint64_t FileRemover::removed() const {
  std::lock_guard lock(mutex_);
  return removed_;
}

uint64_t FileRemover::failed() const {
  std::lock_guard lock(mutex_);
  return failed_;
}

void FileRemover::run() {
  std::unique_lock lock(mutex_);
  for (;;) {
    wake_.wait(lock, [this] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and all done
    Item item = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    current_ = item.path;
    lock.unlock();
    const int rc = item.directory ? ::rmdir(item.path.c_str()) : ::unlink(item.path.c_str());
    const int error = rc == 0 ? 0 : errno;
    if (error != 0 && error != ENOENT) {
      LOG_ERROR("cannot remove {} {}: {}", item.directory ? "directory" : "file", item.path,
                std::strerror(error));
    }
    lock.lock();
    busy_ = false;
    current_.clear();
    if (error == 0 && !item.directory) ++removed_;
    if (error != 0 && error != ENOENT) ++failed_;
    idle_.notify_all();  // drain() waits for an empty queue, claim() for this path
  }
}

}  // namespace ramkv::backup
