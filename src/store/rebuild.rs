//! Buildbot's `rebuild` of a build: a new buildset like the build's.

use super::buildsets::{get_buildset, insert_buildset, BuildsetIds, NewBuildset, Source};
use super::db::args;
use super::Store;

impl Store {
    /// The name of the builder of build `buildid`, if there is one.
    pub async fn build_builder(&self, buildid: i64) -> anyhow::Result<Option<String>> {
        self.call(move |c| {
            c.query_opt(
                "SELECT bl.name FROM builds b JOIN builders bl ON bl.id = b.builderid WHERE b.id = ?1",
                args![buildid],
            )?
            .map(|r| r.get(0))
            .transpose()
        })
        .await
    }

    /// Buildbot's `rebuild` of a build: a new buildset for that build's
    /// builder with its buildset's sourcestamps, properties, external id
    /// and parent, and its request's priority. `None` when there is no
    /// such build.
    pub async fn rebuild(
        &self,
        buildid: i64,
        reason: String,
    ) -> anyhow::Result<Option<BuildsetIds>> {
        let ids = self
            .call(move |c| {
                let Some(r) = c.query_opt(
                    "SELECT q.buildsetid, bl.name, q.priority FROM builds b
                     JOIN buildrequests q ON q.id = b.buildrequestid
                     JOIN builders bl ON bl.id = q.builderid WHERE b.id = ?1",
                    args![buildid],
                )?
                else {
                    return Ok(None);
                };
                let (bsid, builder, priority): (i64, String, i64) =
                    (r.get(0)?, r.get(1)?, r.get(2)?);
                let Some(old) = get_buildset(c, bsid)? else {
                    return Ok(None);
                };
                let new = NewBuildset {
                    scheduler: "rebuild".into(),
                    reason: reason.clone(),
                    external_idstring: old.external_idstring,
                    source: Source::SourceStamps(old.sourcestamps),
                    properties: old.properties,
                    builders: vec![builder],
                    priority,
                    parent_buildid: old.parent_buildid,
                };
                insert_buildset(c, &new).map(Some)
            })
            .await?;
        if let Some(ids) = &ids {
            self.buildset_added(ids);
        }
        Ok(ids)
    }
}
