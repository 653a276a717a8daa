// SmallFilesystem: a small ext4 filesystem of its own for one test, so that the test can
// fill a real disk (kNoSpace) without touching the machine's. An image file in a TempDir
// under /var/tmp, formatted with mkfs.ext4 and loop-mounted; unmounted (which frees the
// loop device) and removed with its directory on every path out of the test, failed
// REQUIREs included.
//
// Needs root, a loop device and mkfs.ext4 (e2fsprogs, from scripts/setup.sh). Where one is
// missing, create() says why and the test reports itself skipped.
#pragma once

#include <stdio.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <string>

#include "test/temp_dir.h"

namespace ramkv::test {

class SmallFilesystem {
 public:
  // A mounted filesystem of `bytes` (at least a few MiB), or nullptr with *why saying
  // what is missing.
  static std::unique_ptr<SmallFilesystem> create(uint64_t bytes, std::string* why) {
    if (::geteuid() != 0) {
      *why = "mounting a loop device needs root";
      return nullptr;
    }
    std::unique_ptr<SmallFilesystem> fs(new SmallFilesystem());
    std::string image = fs->dir_.path + "/image";
    std::string mount_point = fs->dir_.path + "/mnt";
    // mkfs.ext4 lives in /sbin, which a non-login PATH may lack.
    if (!run("truncate -s " + std::to_string(bytes) + " " + image, why) ||
        !run("PATH=\"$PATH:/usr/sbin:/sbin\" mkfs.ext4 -q -F " + image, why) ||
        !run("mkdir " + mount_point, why) ||
        !run("mount -o loop " + image + " " + mount_point, why)) {
      return nullptr;
    }
    fs->path_ = mount_point;
    return fs;
  }

  ~SmallFilesystem() {
    if (path_.empty()) return;
    // Lazily if something still holds it, so the loop device is freed once let go.
    if (::umount2(path_.c_str(), 0) != 0) ::umount2(path_.c_str(), MNT_DETACH);
  }
  SmallFilesystem(const SmallFilesystem&) = delete;
  SmallFilesystem& operator=(const SmallFilesystem&) = delete;

  // The mount point; valid while this object lives.
  const std::string& path() const { return path_; }

 private:
  SmallFilesystem() = default;

  // Runs a shell command; on failure sets *why to the command and what it printed.
  static bool run(const std::string& command, std::string* why) {
    FILE* p = ::popen((command + " 2>&1").c_str(), "r");
    if (p == nullptr) {
      *why = "cannot run: " + command;
      return false;
    }
    std::string output;
    char chunk[256];
    size_t n;
    while ((n = ::fread(chunk, 1, sizeof chunk, p)) > 0) output.append(chunk, n);
    int status = ::pclose(p);
    if (status == 0) return true;
    while (!output.empty() && (output.back() == '\n' || output.back() == ' ')) output.pop_back();
    *why = "'" + command + "' failed" + (output.empty() ? "" : ": " + output);
    return false;
  }

  // Member order is teardown order, reversed: the destructor unmounts before dir_ (image
  // and mount point) is removed.
  TempDir dir_{"/var/tmp"};
  std::string path_;  // empty until mounted
};

}  // namespace ramkv::test
