// The Store contract: files and their content.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "fixture.h"

namespace kvb::store::conformance {
namespace {

std::vector<std::string> Ids(const std::vector<FileRecord>& files) {
  std::vector<std::string> ids;
  for (const FileRecord& f : files) ids.push_back(f.id);
  return ids;
}

// Bytes of every value (NUL included), longer than two 1 MiB pieces.
std::string BigContent() {
  std::string s;
  s.reserve(2'621'500);
  for (size_t i = 0; s.size() < 2'621'440 + 7; ++i) s.push_back(static_cast<char>((i * 131 + i / 977) & 0xff));
  return s;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST_P(StoreTest, PutFileStoresRecordAndContent) {
  const std::string content = BigContent();
  const std::string local = LocalCopy("upload", content);
  FileRecord f = MakeFile("file-a", 100, static_cast<int64_t>(content.size()));
  f.filename = std::string("we\xff" "ird\0name.jsonl", 15);  // any bytes, as uploaded
  ASSERT_TRUE(store().PutFile(f, local).ok());
  EXPECT_FALSE(std::filesystem::exists(local)) << "PutFile consumes local_path";

  auto got = store().GetFile("file-a");
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->id, "file-a");
  EXPECT_EQ(got->filename, f.filename);
  EXPECT_EQ(got->purpose, "batch");
  EXPECT_EQ(got->bytes, static_cast<int64_t>(content.size()));
  EXPECT_EQ(got->created_at, 100);
  EXPECT_EQ(got->expires_at, 3700);
  EXPECT_EQ(ReadAll("file-a"), content);
}

TEST_P(StoreTest, ReadFileReturnsRangesAndAppends) {
  const std::string content = BigContent();
  const auto size = static_cast<int64_t>(content.size());
  ASSERT_TRUE(store().PutFile(MakeFile("file-a", 1, size), LocalCopy("upload", content)).ok());
  const int64_t mib = int64_t{1} << 20;
  struct Range {
    int64_t offset, max;
  };
  // Within a piece, across one and two piece boundaries, cut by the end
  // (also when max_bytes is far past it: "the rest"), past the end, empty.
  for (Range r : {Range{0, 10}, Range{mib - 5, 10}, Range{mib - 1, mib + 2}, Range{size - 3, 100},
                  Range{size - 3, int64_t{1} << 40}, Range{size, 10}, Range{size + 10, 10}, Range{17, 0},
                  Range{2 * mib, mib}}) {
    std::string out = "prefix:";
    Status s = store().ReadFile("file-a", r.offset, r.max, &out);
    ASSERT_TRUE(s.ok()) << s.ToString();
    const std::string want = r.offset >= size ? "" : content.substr(static_cast<size_t>(r.offset),
                                                                     static_cast<size_t>(std::min(r.max, size)));
    EXPECT_EQ(out, "prefix:" + want) << "offset " << r.offset << " max " << r.max;
  }
  std::string out;
  EXPECT_EQ(store().ReadFile("file-nope", 0, 10, &out).code(), StatusCode::kNotFound);
}

TEST_P(StoreTest, EmptyFile) {
  ASSERT_TRUE(store().PutFile(MakeFile("file-e", 1, 0), LocalCopy("empty", "")).ok());
  EXPECT_EQ(store().GetFile("file-e")->bytes, 0);
  EXPECT_EQ(ReadAll("file-e"), "");
  auto local = store().LocalFile("file-e", cache_dir_);
  ASSERT_TRUE(local.ok()) << local.status().ToString();
  EXPECT_EQ(Slurp(*local), "");
}

TEST_P(StoreTest, DuplicateFileIdKeepsTheFirstAndLeavesTheLocalFile) {
  ASSERT_TRUE(store().PutFile(MakeFile("file-a", 1, 5), LocalCopy("one", "first")).ok());
  const std::string second = LocalCopy("two", "other");
  Status dup = store().PutFile(MakeFile("file-a", 2, 5), second);
  EXPECT_EQ(dup.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(dup.message().find("already exists"), std::string::npos) << dup.message();
  EXPECT_EQ(Slurp(second), "other") << "a failed PutFile leaves local_path to the caller";
  EXPECT_EQ(store().GetFile("file-a")->created_at, 1);
  EXPECT_EQ(ReadAll("file-a"), "first");
}

TEST_P(StoreTest, UnknownFileIdsAreNotFound) {
  std::string out;
  EXPECT_EQ(store().GetFile("file-nope").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store().GetFile(std::string("file-\xc3\0\xff", 8)).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store().DeleteFile("file-nope").code(), StatusCode::kNotFound);
  EXPECT_EQ(store().ReadFile("file-nope", 0, 1, &out).code(), StatusCode::kNotFound);
  EXPECT_EQ(store().LocalFile("file-nope", cache_dir_).status().code(), StatusCode::kNotFound);
}

TEST_P(StoreTest, DeleteFileRemovesRecordAndContent) {
  ASSERT_TRUE(store().PutFile(MakeFile("file-a", 1, 3), LocalCopy("a", "abc")).ok());
  ASSERT_TRUE(store().PutFile(MakeFile("file-b", 2, 3), LocalCopy("b", "xyz")).ok());
  ASSERT_TRUE(store().DeleteFile("file-a").ok());
  std::string out;
  EXPECT_EQ(store().GetFile("file-a").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store().ReadFile("file-a", 0, 3, &out).code(), StatusCode::kNotFound);
  EXPECT_EQ(store().LocalFile("file-a", cache_dir_).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store().DeleteFile("file-a").code(), StatusCode::kNotFound);
  EXPECT_EQ(ReadAll("file-b"), "xyz");
  // The id may be used again, with new content.
  ASSERT_TRUE(store().PutFile(MakeFile("file-a", 3, 4), LocalCopy("a2", "new!")).ok());
  EXPECT_EQ(ReadAll("file-a"), "new!");
}

TEST_P(StoreTest, LocalFileHoldsTheContentAndIsReused) {
  const std::string content = BigContent();
  ASSERT_TRUE(store()
                  .PutFile(MakeFile("file-a", 1, static_cast<int64_t>(content.size())), LocalCopy("upload", content))
                  .ok());
  auto path = store().LocalFile("file-a", cache_dir_);
  ASSERT_TRUE(path.ok()) << path.status().ToString();
  EXPECT_EQ(Slurp(*path), content);
  auto again = store().LocalFile("file-a", cache_dir_);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *path);
  EXPECT_EQ(Slurp(*again), content);
}

TEST_P(StoreTest, ListFilesByPurposeInBothOrdersWithPaging) {
  // b and c share a second: creation order breaks the tie.
  struct F {
    const char* id;
    int64_t t;
    const char* purpose;
  };
  for (F f : {F{"file-a", 10, "batch"}, F{"file-b", 20, "batch_output"}, F{"file-c", 20, "batch"},
              F{"file-d", 30, "batch"}, F{"file-e", 40, "batch_output"}})
    ASSERT_TRUE(store().PutFile(MakeFile(f.id, f.t, 1, f.purpose), LocalCopy(f.id, "x")).ok());

  auto asc = store().ListFiles("", "", 100, true);
  ASSERT_TRUE(asc.ok());
  EXPECT_EQ(Ids(*asc), (std::vector<std::string>{"file-a", "file-b", "file-c", "file-d", "file-e"}));
  auto desc = store().ListFiles("", "", 100, false);
  EXPECT_EQ(Ids(*desc), (std::vector<std::string>{"file-e", "file-d", "file-c", "file-b", "file-a"}));
  auto batch = store().ListFiles("batch", "", 100, true);
  EXPECT_EQ(Ids(*batch), (std::vector<std::string>{"file-a", "file-c", "file-d"}));

  for (bool ascending : {true, false}) {
    std::vector<std::string> paged;
    std::string after;
    for (int pages = 0; pages < 10; ++pages) {
      auto page = store().ListFiles("", after, 2, ascending);
      ASSERT_TRUE(page.ok());
      if (page->empty()) break;
      for (auto& f : *page) paged.push_back(f.id);
      after = page->back().id;
    }
    EXPECT_EQ(paged, Ids(ascending ? *asc : *desc));
  }
  EXPECT_EQ(Ids(*store().ListFiles("batch", "file-a", 1, true)), std::vector<std::string>{"file-c"});
  EXPECT_TRUE(store().ListFiles("", "file-nope", 10, true)->empty());
  EXPECT_TRUE(store().ListFiles("", "", 0, true)->empty());
  EXPECT_TRUE(store().ListFiles("nope", "", 10, true)->empty());
}

}  // namespace
}  // namespace kvb::store::conformance
