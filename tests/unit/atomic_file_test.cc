// util/atomic_file.h: a file under its final name is always whole.
#include "util/atomic_file.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace {

namespace fs = std::filesystem;

class AtomicFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "kvb_atomic_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Read(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }
  std::string dir_;
};

TEST_F(AtomicFileTest, CommitReplacesTheFileWhole) {
  const std::string path = dir_ + "/out.jsonl";
  std::ofstream(path) << "old\n";
  kvb::util::AtomicFileWriter w;
  ASSERT_TRUE(w.Open(path, 0640).ok());
  ASSERT_TRUE(w.AppendLine("one").ok());
  ASSERT_TRUE(w.AppendLine("two").ok());
  EXPECT_EQ(Read(path), "old\n") << "nothing changes before Commit";
  EXPECT_EQ(w.bytes(), 8);
  ASSERT_TRUE(w.Commit().ok());
  EXPECT_EQ(Read(path), "one\ntwo\n");
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);
}

TEST_F(AtomicFileTest, AnAbandonedWriteLeavesNothingBehind) {
  const std::string path = dir_ + "/out.jsonl";
  {
    kvb::util::AtomicFileWriter w;
    ASSERT_TRUE(w.Open(path, 0600, ".part").ok());
    ASSERT_TRUE(w.Append(std::string(3 << 20, 'x')).ok());  // past the buffer: on disk
    EXPECT_TRUE(fs::exists(path + ".part"));
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".part"));
}

TEST_F(AtomicFileTest, ReleaseHandsOverASyncedFileAndMoveFileDurablyPutsItInPlace) {
  kvb::util::AtomicFileWriter w;
  ASSERT_TRUE(w.Open(dir_ + "/upload").ok());
  ASSERT_TRUE(w.Append("content").ok());
  auto local = w.Release();
  ASSERT_TRUE(local.ok());
  EXPECT_EQ(Read(*local), "content");
  const std::string dest = dir_ + "/sub/stored";
  fs::create_directories(dir_ + "/sub");
  ASSERT_TRUE(kvb::util::MoveFileDurably(*local, dest).ok());
  EXPECT_EQ(Read(dest), "content");
  EXPECT_FALSE(fs::exists(*local));
  EXPECT_FALSE(kvb::util::MoveFileDurably(dir_ + "/missing", dest).ok());
}

}  // namespace
