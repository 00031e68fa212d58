#include "engine/prefix_cache.h"

#include <gtest/gtest.h>

namespace kvb::engine {
namespace {

std::vector<Token> Seq(std::initializer_list<Token> t) { return t; }

TEST(PrefixCache, EmptyCacheMatchesNothing) {
  PrefixCache c;
  auto m = c.Longest(Seq({1, 2, 3}), 3);
  EXPECT_EQ(m.length, 0);
  EXPECT_EQ(m.seq, -1);
}

TEST(PrefixCache, MatchesLongestResidentPrefixIncludingInsideAnEdge) {
  PrefixCache c;
  c.Insert(5, Seq({1, 2, 3, 4, 5}));
  auto m = c.Longest(Seq({1, 2, 3, 9}), 10);
  EXPECT_EQ(m.length, 3);
  EXPECT_EQ(m.seq, 5);
  m = c.Longest(Seq({1, 2, 3, 4, 5, 6, 7}), 10);
  EXPECT_EQ(m.length, 5);
  EXPECT_EQ(c.Longest(Seq({2, 2}), 10).length, 0);
}

TEST(PrefixCache, MatchIsCappedAtMaxLen) {
  PrefixCache c;
  c.Insert(1, Seq({1, 2, 3, 4}));
  EXPECT_EQ(c.Longest(Seq({1, 2, 3, 4}), 3).length, 3);
}

TEST(PrefixCache, InsertSplitsEdgesAndEachBranchNamesItsAnchor) {
  PrefixCache c;
  c.Insert(1, Seq({1, 2, 3, 4}));
  c.Insert(2, Seq({1, 2, 7, 8}));
  EXPECT_EQ(c.NodeCount(), 3u);  // [1 2] -> [3 4], [7 8]
  EXPECT_EQ(c.Longest(Seq({1, 2, 3, 4, 9}), 9).seq, 1);
  EXPECT_EQ(c.Longest(Seq({1, 2, 7, 9}), 9).seq, 2);
  auto shared = c.Longest(Seq({1, 2, 9}), 9);
  EXPECT_EQ(shared.length, 2);
  EXPECT_TRUE(shared.seq == 1 || shared.seq == 2);
}

TEST(PrefixCache, ShorterAnchorOnTheSamePathSplitsTheEdge) {
  PrefixCache c;
  c.Insert(1, Seq({1, 2, 3, 4}));
  c.Insert(2, Seq({1, 2}));
  EXPECT_EQ(c.NodeCount(), 2u);
  c.Touch(2);
  EXPECT_EQ(c.Longest(Seq({1, 2, 5}), 9).seq, 2);  // most recently used wins
  EXPECT_EQ(c.Longest(Seq({1, 2, 3}), 9).seq, 1);
}

TEST(PrefixCache, RemoveMergesSplitEdgesBack) {
  PrefixCache c;
  c.Insert(1, Seq({1, 2, 3, 4}));
  c.Insert(2, Seq({1, 2, 7, 8}));
  c.Remove(2);
  EXPECT_EQ(c.NodeCount(), 1u);
  EXPECT_EQ(c.Longest(Seq({1, 2, 7}), 9).length, 2);
  EXPECT_EQ(c.Longest(Seq({1, 2, 3, 4}), 9).length, 4);
  c.Remove(1);
  EXPECT_EQ(c.NodeCount(), 0u);
  EXPECT_EQ(c.size(), 0u);
}

TEST(PrefixCache, ReferencedAnchorsAreNotOfferedForEviction) {
  PrefixCache c;
  c.Insert(1, Seq({1}));
  c.Insert(2, Seq({2}));
  c.Insert(3, Seq({3}));
  c.Acquire(1);  // also marks 1 as recently used
  EXPECT_EQ(c.LruIdle(), 2);
  EXPECT_EQ(c.LruIdle(/*keep=*/2), 3);
  c.Acquire(2);
  c.Acquire(3);
  EXPECT_FALSE(c.LruIdle().has_value());
  c.Release(2);
  EXPECT_EQ(c.Refs(2), 0);
  EXPECT_EQ(c.Refs(3), 1);
  EXPECT_EQ(c.LruIdle(), 2);
}

TEST(PrefixCache, EvictionIsLeastRecentlyUsedFirst) {
  PrefixCache c;
  c.Insert(1, Seq({1}));
  c.Insert(2, Seq({2}));
  c.Touch(1);
  EXPECT_EQ(c.LruIdle(), 2);
  c.Touch(2);
  EXPECT_EQ(c.LruIdle(), 1);
}

}  // namespace
}  // namespace kvb::engine
