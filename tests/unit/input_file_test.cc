#include "batch/input_file.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace kvb::batch {
namespace {

namespace fs = std::filesystem;

class InputFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("kvb_input_file_test_" + std::to_string(getpid()) + "_" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Write(const std::string& content, const std::string& name = "in.jsonl") {
    std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << content;
    return path;
  }

  fs::path dir_;
};

std::string Chat(const std::string& id, const std::string& user = "hi") {
  return R"({"custom_id":")" + id +
         R"(","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"system","content":"S"},{"role":"user","content":")" +
         user + R"("}]}})";
}

std::string Completion(const std::string& id) {
  return R"({"custom_id":")" + id + R"(","method":"POST","url":"/v1/completions","body":{"prompt":"p"}})";
}

TEST_F(InputFileTest, SkipsBlankLinesAndKeepsPhysicalLineNumbers) {
  std::string path = Write("\n" + Chat("a") + "\n   \n\t\r\n" + Completion("b") + "\n\n");
  auto scan = ScanInputFile(path);
  ASSERT_TRUE(scan.ok()) << scan.status().ToString();
  EXPECT_EQ(scan->total_lines, 2);
  EXPECT_TRUE(scan->errors.empty());
  ASSERT_EQ(scan->valid.size(), 2u);
  EXPECT_EQ(scan->valid[0].line_no, 2);
  EXPECT_EQ(scan->valid[0].custom_id, "a");
  EXPECT_EQ(scan->valid[0].endpoint, Endpoint::kChatCompletions);
  EXPECT_EQ(scan->valid[1].line_no, 5);
  EXPECT_EQ(scan->valid[1].custom_id, "b");
  EXPECT_EQ(scan->valid[1].endpoint, Endpoint::kCompletions);
}

TEST_F(InputFileTest, ErrorLineNumbersAreOneBasedAndExact) {
  std::string path = Write(Chat("a") + "\n" + "not json\n" + "\n" + Chat("") + "\n" + Chat("c") + "\n");
  auto scan = ScanInputFile(path);
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->total_lines, 4);
  ASSERT_EQ(scan->errors.size(), 2u);
  EXPECT_EQ(scan->errors[0].line, 2);
  EXPECT_EQ(scan->errors[0].code, kInvalidJson);
  EXPECT_EQ(scan->errors[1].line, 4);
  EXPECT_EQ(scan->errors[1].code, kMissingCustomId);
  ASSERT_EQ(scan->valid.size(), 2u);
  EXPECT_EQ(scan->valid[1].line_no, 5);
  EXPECT_EQ(scan->valid.size() + scan->errors.size(), static_cast<size_t>(scan->total_lines));
}

TEST_F(InputFileTest, RejectsDuplicateCustomIdWithBothLineNumbers) {
  std::string path = Write(Chat("a") + "\n" + Chat("b") + "\n" + Chat("a", "again") + "\n");
  auto scan = ScanInputFile(path);
  ASSERT_TRUE(scan.ok());
  ASSERT_EQ(scan->valid.size(), 2u);
  EXPECT_EQ(scan->valid[0].line_no, 1);
  ASSERT_EQ(scan->errors.size(), 1u);
  const LineError& e = scan->errors[0];
  EXPECT_EQ(e.line, 3);
  EXPECT_EQ(e.code, kDuplicateCustomId);
  EXPECT_EQ(e.custom_id, "a");
  EXPECT_NE(e.message.find("line 1"), std::string::npos) << e.message;
}

TEST_F(InputFileTest, DuplicateOfAnInvalidLineIsStillADuplicate) {
  // The first "a" is invalid; with --skip-invalid it gets an error line under
  // "a", so a later valid "a" must not also be answered.
  std::string bad = R"({"custom_id":"a","method":"GET","url":"/v1/completions","body":{"prompt":"p"}})";
  std::string path = Write(bad + "\n" + Completion("a") + "\n");
  auto scan = ScanInputFile(path);
  ASSERT_TRUE(scan.ok());
  EXPECT_TRUE(scan->valid.empty());
  ASSERT_EQ(scan->errors.size(), 2u);
  EXPECT_EQ(scan->errors[0].code, kInvalidMethod);
  EXPECT_EQ(scan->errors[1].code, kDuplicateCustomId);
  EXPECT_EQ(scan->errors[1].line, 2);
}

TEST_F(InputFileTest, ReadLineReturnsExactBytesByOffset) {
  std::string l1 = Chat("a", "first");
  std::string l2 = Completion("b");
  std::string l3 = Chat("c", "third \\u00e9");
  std::string path = Write(l1 + "\r\n\n" + l2 + "\n" + l3 + "\n");
  auto scan = ScanInputFile(path);
  ASSERT_TRUE(scan.ok());
  ASSERT_EQ(scan->valid.size(), 3u);
  auto reader = InputReader::Open(path);
  ASSERT_TRUE(reader.ok());
  // Out of order on purpose: reads are by offset, not sequential.
  auto r3 = reader->ReadLine(scan->valid[2]);
  auto r1 = reader->ReadLine(scan->valid[0]);
  auto r2 = reader->ReadLine(scan->valid[1]);
  ASSERT_TRUE(r1.ok() && r2.ok() && r3.ok());
  EXPECT_EQ(*r1, l1);  // "\r\n" terminator excluded
  EXPECT_EQ(*r2, l2);
  EXPECT_EQ(*r3, l3);
  EXPECT_EQ(scan->valid[1].offset, l1.size() + 3);
}

TEST_F(InputFileTest, HandlesFileWithoutTrailingNewline) {
  std::string last = Completion("z");
  std::string path = Write(Chat("a") + "\n" + last);
  auto scan = ScanInputFile(path);
  ASSERT_TRUE(scan.ok());
  ASSERT_EQ(scan->valid.size(), 2u);
  EXPECT_EQ(scan->valid[1].line_no, 2);
  auto reader = InputReader::Open(path);
  ASSERT_TRUE(reader.ok());
  auto text = reader->ReadLine(scan->valid[1]);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, last);
}

TEST_F(InputFileTest, LinesSpanningReadChunksAreReassembled) {
  // Longer than the 4 MiB read chunk, so the line crosses chunk boundaries.
  std::string big(5 << 20, 'x');
  std::string l2 = Chat("big", big);
  std::string path = Write(Chat("a") + "\n" + l2 + "\n" + Chat("c") + "\n");
  auto scan = ScanInputFile(path);
  ASSERT_TRUE(scan.ok());
  ASSERT_EQ(scan->valid.size(), 3u) << (scan->errors.empty() ? "" : scan->errors[0].message);
  EXPECT_EQ(scan->valid[1].length, l2.size());
  auto reader = InputReader::Open(path);
  ASSERT_TRUE(reader.ok());
  auto text = reader->ReadLine(scan->valid[1]);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, l2);
  EXPECT_EQ(scan->valid[2].line_no, 3);
}

TEST_F(InputFileTest, LineOverLimitIsAnErrorAndScanGoesOn) {
  std::string path = Write(Chat("a") + "\n" + Chat("long", std::string(1000, 'y')) + "\n" + Chat("c") + "\n");
  auto scan = ScanInputFile(path, 500);
  ASSERT_TRUE(scan.ok());
  ASSERT_EQ(scan->errors.size(), 1u);
  EXPECT_EQ(scan->errors[0].line, 2);
  EXPECT_EQ(scan->errors[0].code, kLineTooLong);
  ASSERT_EQ(scan->valid.size(), 2u);
  EXPECT_EQ(scan->valid[1].line_no, 3);
  EXPECT_EQ(scan->total_lines, 3);
}

TEST_F(InputFileTest, EmptyFileHasNoLines) {
  auto scan = ScanInputFile(Write(""));
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->total_lines, 0);
  EXPECT_TRUE(scan->valid.empty());
}

TEST_F(InputFileTest, MissingFileIsNotFound) {
  auto scan = ScanInputFile((dir_ / "nope.jsonl").string());
  ASSERT_FALSE(scan.ok());
  EXPECT_EQ(scan.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(InputReader::Open((dir_ / "nope.jsonl").string()).status().code(), StatusCode::kNotFound);
}

TEST_F(InputFileTest, ReadLineFailsWhenFileShrank) {
  std::string path = Write(Chat("a") + "\n" + Chat("b") + "\n");
  auto scan = ScanInputFile(path);
  ASSERT_TRUE(scan.ok());
  fs::resize_file(path, 10);
  auto reader = InputReader::Open(path);
  ASSERT_TRUE(reader.ok());
  auto text = reader->ReadLine(scan->valid[1]);
  ASSERT_FALSE(text.ok());
  EXPECT_EQ(text.status().code(), StatusCode::kIoError);
}

TEST_F(InputFileTest, ReaderIsMovable) {
  std::string path = Write(Chat("a") + "\n");
  auto scan = ScanInputFile(path);
  ASSERT_TRUE(scan.ok());
  auto opened = InputReader::Open(path);
  ASSERT_TRUE(opened.ok());
  InputReader moved = std::move(opened.value());
  auto text = moved.ReadLine(scan->valid[0]);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, Chat("a"));
}

}  // namespace
}  // namespace kvb::batch
