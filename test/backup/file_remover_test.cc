#include "backup/file_remover.h"

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "test/temp_dir.h"

namespace ramkv::backup {
namespace {

TEST_CASE("file remover: files, then their directory, in the order asked",
          "[backup][file_remover]") {
  test::TempDir tmp("/var/tmp");
  const std::string dir = tmp.path + "/m";
  std::filesystem::create_directory(dir);
  std::vector<std::string> files;
  for (int i = 0; i < 20; ++i) {
    files.push_back(dir + "/" + std::to_string(i));
    std::ofstream(files.back()) << "replica " << i;
  }
  files.push_back(dir + "/never-there");  // already gone: fine, not counted
  FileRemover remover;
  remover.remove(files, dir);
  remover.drain();
  CHECK_FALSE(std::filesystem::exists(dir));
  CHECK(remover.removed() == 20);
  CHECK(remover.failed() == 0);
}

TEST_CASE("file remover: what cannot go is counted and the rest still goes",
          "[backup][file_remover]") {
  test::TempDir tmp("/var/tmp");
  const std::string kept = tmp.path + "/kept";
  std::filesystem::create_directory(kept);
  std::ofstream(kept + "/not-asked") << "x";  // leaves the directory not empty
  std::ofstream(kept + "/asked") << "y";
  {
    std::filesystem::create_directory(tmp.path + "/a-directory-is-not-a-file");
    FileRemover remover;
    remover.remove({kept + "/asked"}, kept);
    remover.remove({tmp.path + "/a-directory-is-not-a-file"}, {});
    remover.drain();
    CHECK(remover.removed() == 1);
    CHECK(remover.failed() == 2);  // the directory not empty; unlink of a directory
  }
  CHECK_FALSE(std::filesystem::exists(kept + "/asked"));
  CHECK(std::filesystem::exists(kept + "/not-asked"));
}

TEST_CASE("file remover: destroyed with work queued, it finishes it first",
          "[backup][file_remover]") {
  test::TempDir tmp("/var/tmp");
  std::vector<std::string> files;
  for (int i = 0; i < 50; ++i) {
    files.push_back(tmp.path + "/" + std::to_string(i));
    std::ofstream(files.back()) << i;
  }
  { FileRemover(/*no drain*/).remove(files); }
  for (const auto& f : files) CHECK_FALSE(std::filesystem::exists(f));
}

TEST_CASE("file remover: a claimed path keeps the file created after the claim",
          "[backup][file_remover]") {
  test::TempDir tmp;
  std::vector<std::string> files;
  for (int i = 0; i < 200; ++i) {
    files.push_back(tmp.path + "/f" + std::to_string(i));
    std::ofstream(files.back()) << "old";
  }
  const std::string last = files.back();
  const std::string middle = files[100];
  FileRemover remover;
  remover.remove(files);
  // Whether each removal is still queued or under way when claimed, the new file stays.
  remover.claim(middle);
  std::ofstream(middle) << "new";
  remover.claim(last);
  std::ofstream(last) << "new";
  remover.claim(tmp.path + "/never-queued");  // nothing to wait for
  remover.drain();
  auto content = [](const std::string& path) {
    std::ifstream in(path);
    std::string s;
    in >> s;
    return s;
  };
  CHECK(content(middle) == "new");
  CHECK(content(last) == "new");
  CHECK_FALSE(std::filesystem::exists(files[0]));
  CHECK_FALSE(std::filesystem::exists(files[199 - 1]));
}

}  // namespace
}  // namespace ramkv::backup
