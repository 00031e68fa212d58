// Chunking at validation (worker/batch_files.h): the unit workers claim.
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <vector>

#include "worker/batch_files.h"

namespace {

using kvb::store::PendingRequest;

// Rows with the given prefix hashes, in file order (line = index + 1).
std::vector<PendingRequest> Rows(const std::vector<uint64_t>& hashes) {
  std::vector<PendingRequest> rows;
  for (size_t i = 0; i < hashes.size(); ++i) {
    PendingRequest p;
    p.line = static_cast<int64_t>(i) + 1;
    p.prefix_hash = hashes[i];
    rows.push_back(p);
  }
  return rows;
}

std::map<int64_t, std::vector<int64_t>> LinesByChunk(const std::vector<PendingRequest>& rows) {
  std::map<int64_t, std::vector<int64_t>> out;
  for (const auto& r : rows) out[r.chunk].push_back(r.line);
  return out;
}

TEST(AssignChunks, GroupsSharePrefixesAndAreCutAtTheChunkSize) {
  // Interleaved in the file: A B A B ... (10 each), chunks of 4.
  std::vector<uint64_t> hashes;
  for (int i = 0; i < 20; ++i) hashes.push_back(i % 2 == 0 ? 0xA : 0xB);
  auto rows = Rows(hashes);
  kvb::worker::AssignChunks(rows, 4);
  auto chunks = LinesByChunk(rows);
  for (const auto& [chunk, lines] : chunks) {
    EXPECT_LE(lines.size(), 4u);
    std::set<uint64_t> prefixes;
    for (int64_t line : lines) prefixes.insert(hashes[static_cast<size_t>(line - 1)]);
    EXPECT_EQ(prefixes.size(), 1u) << "chunk " << chunk << " mixes prefix groups that are big enough";
  }
  // A's 10 rows: chunks of 4, 4, 2; then B's likewise. In file order within a group.
  EXPECT_EQ(chunks.size(), 6u);
  EXPECT_EQ(chunks[0], (std::vector<int64_t>{1, 3, 5, 7}));
  EXPECT_EQ(chunks[3], (std::vector<int64_t>{2, 4, 6, 8}));
}

TEST(AssignChunks, SmallGroupsShareAChunk) {
  // 12 rows, every one its own prefix: chunks of 8 hold 8 and 4 rows, not 12 chunks of 1.
  std::vector<uint64_t> hashes;
  for (uint64_t i = 0; i < 12; ++i) hashes.push_back(100 + i);
  auto rows = Rows(hashes);
  kvb::worker::AssignChunks(rows, 8);
  auto chunks = LinesByChunk(rows);
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_EQ(chunks[0].size(), 8u);
  EXPECT_EQ(chunks[1].size(), 4u);
}

TEST(AssignChunks, AChunkSizeBelowOneIsOne) {
  auto rows = Rows({1, 1, 1});
  kvb::worker::AssignChunks(rows, 0);
  EXPECT_EQ(LinesByChunk(rows).size(), 3u);
}

}  // namespace
